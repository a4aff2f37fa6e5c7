"""ctypes bindings of natsl's C ABI (include/natsl.h). No torch needed here."""

import ctypes
import glob
import os
import sys

MAX_DIMS = 4

# NatslStatus
OK, INVALID_ARGUMENT, UNSUPPORTED, NO_DEVICE, NVRTC_UNAVAILABLE, COMPILE_ERROR, DRIVER_ERROR, IO_ERROR, PANIC = range(9)
STATUS_NAMES = ["OK", "INVALID_ARGUMENT", "UNSUPPORTED", "NO_DEVICE", "NVRTC_UNAVAILABLE", "COMPILE_ERROR", "DRIVER_ERROR", "IO_ERROR", "PANIC"]
# NatslDtype
BF16, F16, F32, I32, U8 = range(5)
# NatslRouter
ROUTER_NONE, ROUTER_ARGMAX, ROUTER_BUDGET = range(3)


class NatslError(RuntimeError):
    """A natsl call failed: `status` (a NatslStatus) and the library's message."""

    def __init__(self, status, message):
        self.status = status
        name = STATUS_NAMES[status] if 0 <= status < len(STATUS_NAMES) else str(status)
        super().__init__(f"natsl: {name}: {message}")


class Tensor(ctypes.Structure):
    _fields_ = [
        ("ptr", ctypes.c_uint64),
        ("dtype", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.c_int64 * MAX_DIMS),
        ("strides", ctypes.c_int64 * MAX_DIMS),
        ("capacity", ctypes.c_int64),
    ]


def tensor(ptr, dtype, shape, strides=None, capacity=0):
    """A descriptor of device memory (`ptr` 0 = an absent optional argument)."""
    t = Tensor()
    t.ptr, t.dtype, t.ndim, t.capacity = ptr, dtype, len(shape), capacity
    if strides is None:
        strides, s = [0] * len(shape), 1
        for i in reversed(range(len(shape))):
            strides[i], s = s, s * shape[i]
    for i, (n, st) in enumerate(zip(shape, strides)):
        t.shape[i], t.strides[i] = n, st
    return t


ABSENT = Tensor()  # ptr 0


class Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("dtype", "gdn_dk", "gdn_dv", "sparse_dk", "sparse_dv", "router")]


class GdnPrefillArgs(ctypes.Structure):
    _fields_ = [(n, Tensor) for n in ("q", "k", "v", "g", "beta", "labels", "h0", "h0_index", "o", "committed", "committed_index", "running", "running_index", "gsum_running")] + [
        ("scale", ctypes.c_float),
        ("l2norm", ctypes.c_int32),
    ]


class GdnDecodeArgs(ctypes.Structure):
    _fields_ = [(n, Tensor) for n in ("q", "k", "v", "g", "beta", "labels", "o", "running", "running_index", "committed", "committed_index", "gsum", "pos")] + [
        ("tokens_per_seq", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("l2norm", ctypes.c_int32),
    ]


class SparsePrefillArgs(ctypes.Structure):
    _fields_ = [(n, Tensor) for n in ("q", "k", "v", "attn_list", "attn_count", "o", "lse", "q_norm_w", "k_norm_w")] + [("scale", ctypes.c_float)]


class SparseDecodeArgs(ctypes.Structure):
    _fields_ = [(n, Tensor) for n in ("q", "k_pages", "v_pages", "page_table", "page_count", "cur_page", "cur_len", "o", "lse", "q_norm_w", "k_norm_w")] + [
        ("num_queries", ctypes.c_int32),
        ("num_splits", ctypes.c_int32),
        ("scale", ctypes.c_float),
    ]


PROGRESS_FN = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_double, ctypes.c_int, ctypes.c_void_p)

_P = ctypes.c_void_p
_SIGNATURES = {
    "natsl_last_error": ([], ctypes.c_char_p),
    "natsl_version": ([ctypes.POINTER(ctypes.c_uint32)] * 4, ctypes.c_int),
    "natsl_nvrtc_major": ([], ctypes.c_int32),
    "natsl_runtime_create": ([ctypes.POINTER(_P)], ctypes.c_int),
    "natsl_runtime_destroy": ([_P], ctypes.c_int),
    "natsl_runtime_info": ([_P, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int32)], ctypes.c_int),
    "natsl_device_faults": ([_P, ctypes.POINTER(ctypes.c_uint32)], ctypes.c_int),
    "natsl_runtime_warmup": ([_P, ctypes.POINTER(Model), PROGRESS_FN, _P], ctypes.c_int),
    "natsl_batch_create": ([_P, ctypes.POINTER(ctypes.c_int32), ctypes.c_int64, ctypes.c_uint64, _P, ctypes.POINTER(_P)], ctypes.c_int),
    "natsl_batch_destroy": ([_P], ctypes.c_int),
    "natsl_workspace_create": ([ctypes.POINTER(_P)], ctypes.c_int),
    "natsl_workspace_create_from": ([ctypes.c_uint64, ctypes.c_uint64, ctypes.POINTER(_P)], ctypes.c_int),
    "natsl_workspace_destroy": ([_P], ctypes.c_int),
    "natsl_gdn_prefill_validate": ([ctypes.POINTER(ctypes.c_int32), ctypes.c_int64, ctypes.POINTER(GdnPrefillArgs)], ctypes.c_int),
    "natsl_gdn_prefill_workspace_bytes": ([_P, _P, ctypes.POINTER(GdnPrefillArgs), ctypes.POINTER(ctypes.c_uint64)], ctypes.c_int),
    "natsl_gdn_prefill": ([_P, _P, ctypes.POINTER(GdnPrefillArgs), _P, _P], ctypes.c_int),
    "natsl_gdn_decode": ([_P, ctypes.POINTER(GdnDecodeArgs), _P, _P], ctypes.c_int),
    "natsl_gdn_decode_workspace_bytes": ([ctypes.c_uint64], ctypes.c_uint64),
    "natsl_sparse_prefill_validate": ([ctypes.POINTER(ctypes.c_int32), ctypes.c_int64, ctypes.POINTER(SparsePrefillArgs)], ctypes.c_int),
    "natsl_sparse_prefill": ([_P, _P, ctypes.POINTER(SparsePrefillArgs), _P], ctypes.c_int),
    "natsl_sparse_decode_workspace_bytes": ([_P, ctypes.POINTER(SparseDecodeArgs), ctypes.POINTER(ctypes.c_uint64)], ctypes.c_int),
    "natsl_sparse_decode": ([_P, ctypes.POINTER(SparseDecodeArgs), _P, _P], ctypes.c_int),
}


def _find_library():
    here = os.path.dirname(os.path.abspath(__file__))
    cands = [os.environ.get("NATSL_CAPI_LIB", ""), os.path.join(here, "libnatsl_capi.so")]
    # A source checkout: python/natsl -> target/release.
    cands.append(os.path.join(here, "..", "..", "target", "release", "libnatsl_capi.so"))
    for c in cands:
        if c and os.path.isfile(c):
            return c
    raise OSError("libnatsl_capi.so not found: build it (`cargo build --release -p natsl-capi`), install the wheel (python/build_wheel.sh) or set NATSL_CAPI_LIB")


def _point_at_pip_nvrtc(major):
    """Let natsl find NVRTC from the pip wheels of this interpreter (torch installs
    nvidia-cuda-nvrtc-cu12 / nvidia-cuda-nvrtc), wherever site-packages is."""
    if os.environ.get("NATSL_NVRTC"):
        return
    sub = "cuda_nvrtc/lib" if major == 12 else "cu13/lib"
    for p in sys.path:
        hits = glob.glob(os.path.join(p, "nvidia", sub, f"libnvrtc.so.{major}"))
        if hits:
            os.environ["NATSL_NVRTC"] = hits[0]
            return


_lib = None


def lib():
    """The loaded library, with argument types set."""
    global _lib
    if _lib is None:
        l = ctypes.CDLL(_find_library())
        for name, (args, res) in _SIGNATURES.items():
            f = getattr(l, name)
            f.argtypes, f.restype = args, res
        _point_at_pip_nvrtc(l.natsl_nvrtc_major())
        _lib = l
    return _lib


def check(status):
    """Raise NatslError for a failed call."""
    if status != OK:
        raise NatslError(status, (lib().natsl_last_error() or b"").decode(errors="replace"))


def version():
    """(major, minor, patch, abi)."""
    v = [ctypes.c_uint32() for _ in range(4)]
    check(lib().natsl_version(*[ctypes.byref(x) for x in v]))
    return tuple(x.value for x in v)


def cu_array(cu):
    return (ctypes.c_int32 * len(cu))(*[int(x) for x in cu])
