"""The ctypes layer without torch or a GPU: the library loads, reports its version,
a runtime fails cleanly without a device, and validation names bad arguments.
Run with pytest or directly (`python3 python/tests/test_ctypes_abi.py`)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ctypes  # noqa: E402

from natsl import _capi as C  # noqa: E402

BASE = 0x7F0000000000


def at(i):
    """Fake device address i: each tensor 1 MiB apart (an output may not alias an input)."""
    return BASE + (i << 20)

CU = [0, 72, 200]
T, SLOTS = 200, 200 // 64 + 2


def good_gdn():
    a = C.GdnPrefillArgs()
    a.q = C.tensor(at(1), C.BF16, [T, 2, 128])
    a.k = C.tensor(at(2), C.BF16, [T, 2, 128])
    a.v = C.tensor(at(3), C.BF16, [T, 4, 128])
    a.g = C.tensor(at(4), C.F32, [T, 4])
    a.beta = C.tensor(at(5), C.F32, [T, 4])
    a.labels = C.tensor(at(6), C.U8, [SLOTS, 2])
    a.o = C.tensor(at(7), C.BF16, [T, 4, 128])
    return a


def validate(a):
    return C.lib().natsl_gdn_prefill_validate(C.cu_array(CU), len(CU), ctypes.byref(a))


def test_version():
    major, minor, patch, abi = C.version()
    assert (major, minor) == (0, 1) and abi == 1
    assert C.lib().natsl_nvrtc_major() in (12, 13)


def test_runtime_without_device_fails_cleanly():
    h = ctypes.c_void_p()
    st = C.lib().natsl_runtime_create(ctypes.byref(h))
    if st == C.OK:  # a GPU host
        C.lib().natsl_runtime_destroy(h)
        return
    assert st == C.NO_DEVICE and not h.value
    try:
        C.check(st)
        raise AssertionError("check() did not raise")
    except C.NatslError as e:
        assert e.status == C.NO_DEVICE and "no CUDA device" in str(e)


def test_validation_names_the_argument():
    assert validate(good_gdn()) == C.OK
    a = good_gdn()
    a.g = C.tensor(at(4), C.BF16, [T, 4])
    assert validate(a) == C.INVALID_ARGUMENT
    assert b"`g`" in C.lib().natsl_last_error()
    a = good_gdn()
    a.o = C.Tensor()
    assert validate(a) == C.INVALID_ARGUMENT and b"`o`" in C.lib().natsl_last_error()
    a = good_gdn()
    a.h0_index = C.tensor(at(8), C.I32, [2])
    assert validate(a) == C.INVALID_ARGUMENT and b"`h0_index`" in C.lib().natsl_last_error()
    a.h0 = C.tensor(at(9), C.F32, [5, 4, 128, 128])
    a.h0_index = C.tensor(at(8), C.I32, [3])
    assert validate(a) == C.INVALID_ARGUMENT and b"`h0`" in C.lib().natsl_last_error()
    a = good_gdn()
    a.o = C.tensor(at(1), C.BF16, [T, 4, 128])  # over q
    assert validate(a) == C.INVALID_ARGUMENT and b"`o`" in C.lib().natsl_last_error()



def test_device_faults_null_arguments_are_errors():
    out = ctypes.c_uint32(7)
    assert C.lib().natsl_device_faults(None, ctypes.byref(out)) == C.INVALID_ARGUMENT
    assert b"`rt`" in C.lib().natsl_last_error() and out.value == 7


if __name__ == "__main__":
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    failed = 0
    for t in tests:
        try:
            t()
            print(f"ok   {t.__name__}")
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"FAIL {t.__name__}: {e!r}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
