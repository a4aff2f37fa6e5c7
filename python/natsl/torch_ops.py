"""natsl kernels as torch custom ops (torch.library): opaque to torch.compile and
capturable in CUDA graphs. Tensors are passed by pointer and strides, never copied;
every launch goes to torch.cuda.current_stream().

    import natsl.torch_ops as ops
    o, state = ops.gdn_prefill(q, k, v, g, beta, cu_seqlens, cu_list, output_state=True)
    o, lse = ops.sparse_prefill(q, k, v, attn_list, attn_count, cu_seqlens, cu_list)

`cu_list` is the host copy of `cu_seqlens` (validation and launch geometry are
computed on the host; a CUDA graph bakes them in, like the shapes).
"""

import ctypes
import threading
from typing import List, Optional, Tuple

import torch

from . import _capi as C

_DTYPES = {torch.bfloat16: C.BF16, torch.float16: C.F16, torch.float32: C.F32, torch.int32: C.I32, torch.uint8: C.U8}
_runtimes = {}
_lock = threading.Lock()


def desc(t: Optional[torch.Tensor]) -> C.Tensor:
    """A NatslTensor over a CUDA tensor (no copy); None -> absent."""
    if t is None:
        return C.Tensor()
    if not t.is_cuda:
        raise ValueError(f"natsl: tensor on {t.device}, expected a CUDA tensor")
    if t.dtype not in _DTYPES:
        raise TypeError(f"natsl: unsupported dtype {t.dtype}")
    # Elements addressable from data_ptr to the end of the storage (bounds checks).
    cap = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    return C.tensor(t.data_ptr(), _DTYPES[t.dtype], list(t.shape), list(t.stride()), cap)


def device_faults(device: torch.device) -> int:
    """The NATSL_FAULT_* bits natsl's kernels recorded on `device` since the last call
    (out-of-range state-pool indices 1, labels 2, page ids 4, page lengths 8; a repeated or
    out-of-order sparse-prefill list entry 16; index -1 is a padded slot, never a fault),
    cleared by the read. Waits for natsl's stream: not for use
    inside graph capture."""
    out = ctypes.c_uint32()
    C.check(C.lib().natsl_device_faults(runtime(device), ctypes.byref(out)))
    return out.value


def runtime(device: torch.device) -> ctypes.c_void_p:
    """The natsl runtime of a CUDA device (created once, on torch's primary context)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        rt = _runtimes.get(idx)
        if rt is None:
            with torch.cuda.device(idx):
                torch.cuda.init()
                torch.empty(1, device=f"cuda:{idx}")  # makes torch's context current
                h = ctypes.c_void_p()
                C.check(C.lib().natsl_runtime_create(ctypes.byref(h)))
            rt = _runtimes[idx] = h
    return rt


def _stream(device) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


class _Batch:
    """A natsl batch over the caller's device cu_seqlens (no upload)."""

    def __init__(self, rt, cu: torch.Tensor, cu_list: List[int], stream):
        if cu.dtype != torch.int32 or not cu.is_contiguous() or cu.numel() != len(cu_list):
            raise ValueError("natsl: cu_seqlens must be a contiguous int32 CUDA tensor matching cu_list")
        self.h = ctypes.c_void_p()
        arr = C.cu_array(cu_list)
        C.check(C.lib().natsl_batch_create(rt, arr, len(cu_list), cu.data_ptr(), stream, ctypes.byref(self.h)))

    def __enter__(self):
        return self.h

    def __exit__(self, *exc):
        C.lib().natsl_batch_destroy(self.h)


class _Workspace:
    """A natsl workspace over a torch allocation (stream-ordered by torch's allocator)."""

    def __init__(self, nbytes: int, device, zero: bool = False):
        n = max(int(nbytes), 256)
        self.buf = (torch.zeros if zero else torch.empty)(n + 256, dtype=torch.uint8, device=device)
        ptr = self.buf.data_ptr()
        ptr += (-ptr) % 256
        self.h = ctypes.c_void_p()
        C.check(C.lib().natsl_workspace_create_from(ptr, n, ctypes.byref(self.h)))

    def __enter__(self):
        return self.h

    def __exit__(self, *exc):
        C.lib().natsl_workspace_destroy(self.h)


@torch.library.custom_op("natsl::gdn_prefill", mutates_args=())
def gdn_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_list: List[int],
    labels: Optional[torch.Tensor] = None,
    h0: Optional[torch.Tensor] = None,
    scale: float = 0.0,
    l2norm: bool = False,
    output_state: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GDN prefill: q, k [T, Hqk, dk], v [T, Hv, dv], g [T, Hv] f32, beta [T, Hv];
    labels [T/64 + N, Hr] u8 (None: plain GDN); h0 [N, Hv, dk, dv] f32.
    Returns o [T, Hv, dv] and, with output_state, the final (running) state
    [N, Hv, dk, dv] f32 (else an empty tensor). scale 0 = dk^-1/2."""
    T, hv, dv = v.shape
    n, dk = len(cu_list) - 1, q.shape[2]
    o = torch.empty((T, hv, dv), dtype=q.dtype, device=q.device)
    state = torch.empty((n, hv, dk, dv) if output_state else (0,), dtype=torch.float32, device=q.device)
    a = C.GdnPrefillArgs()
    a.q, a.k, a.v, a.g, a.beta, a.labels, a.h0, a.o = desc(q), desc(k), desc(v), desc(g), desc(beta), desc(labels), desc(h0), desc(o)
    if output_state:
        a.running = desc(state)
    a.scale, a.l2norm = scale, int(l2norm)
    rt, s = runtime(q.device), _stream(q.device)
    with _Batch(rt, cu_seqlens, cu_list, s) as b:
        nbytes = ctypes.c_uint64()
        C.check(C.lib().natsl_gdn_prefill_workspace_bytes(rt, b, ctypes.byref(a), ctypes.byref(nbytes)))
        with _Workspace(nbytes.value, q.device) as ws:
            C.check(C.lib().natsl_gdn_prefill(rt, b, ctypes.byref(a), ws, s))
    return o, state


@gdn_prefill.register_fake
def _(q, k, v, g, beta, cu_seqlens, cu_list, labels=None, h0=None, scale=0.0, l2norm=False, output_state=False):
    T, hv, dv = v.shape
    n, dk = len(cu_list) - 1, q.shape[2]
    return q.new_empty((T, hv, dv)), q.new_empty((n, hv, dk, dv) if output_state else (0,), dtype=torch.float32)


@torch.library.custom_op("natsl::sparse_prefill", mutates_args=())
def sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_list: torch.Tensor,
    attn_count: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_list: List[int],
    scale: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse causal softmax over routed 64-token chunks: q [T, Hq, dk],
    k [T, Hkv, dk], v [T, Hkv, dv], attn_list i32 [Hr, T/64 + N], attn_count i32
    [N, Hr]. Returns o [T, Hq, dv] and lse [T, Hq] f32 (natural log)."""
    T, hq, _ = q.shape
    o = torch.empty((T, hq, v.shape[2]), dtype=q.dtype, device=q.device)
    lse = torch.empty((T, hq), dtype=torch.float32, device=q.device)
    a = C.SparsePrefillArgs()
    a.q, a.k, a.v, a.attn_list, a.attn_count, a.o, a.lse = desc(q), desc(k), desc(v), desc(attn_list), desc(attn_count), desc(o), desc(lse)
    a.scale = scale
    rt, s = runtime(q.device), _stream(q.device)
    with _Batch(rt, cu_seqlens, cu_list, s) as b:
        C.check(C.lib().natsl_sparse_prefill(rt, b, ctypes.byref(a), s))
    return o, lse


@sparse_prefill.register_fake
def _(q, k, v, attn_list, attn_count, cu_seqlens, cu_list, scale=0.0):
    T, hq, _ = q.shape
    return q.new_empty((T, hq, v.shape[2])), q.new_empty((T, hq), dtype=torch.float32)


def dense_lists(cu_list: List[int], hr: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Router-format lists where every chunk is ATTN: the sparse prefill is then
    dense causal attention (what SDPA computes)."""
    n = len(cu_list) - 1
    slots = cu_list[-1] // 64 + n
    lst = torch.zeros((hr, slots), dtype=torch.int32)
    cnt = torch.zeros((n, hr), dtype=torch.int32)
    for s in range(n):
        nch = (cu_list[s + 1] - cu_list[s] + 63) // 64
        base = cu_list[s] // 64 + s
        lst[:, base : base + nch] = torch.arange(nch, dtype=torch.int32)
        cnt[s, :] = nch
    return lst.to(device), cnt.to(device)


def warmup(device=None, dtype=torch.bfloat16, gdn=(128, 256), sparse=(64, 128), router=C.ROUTER_ARGMAX, progress=True):
    """Compile (or load) the units a model uses before the first call, printing progress."""
    device = torch.device(device or "cuda")
    m = C.Model(_DTYPES[dtype], gdn[0] if gdn else 0, gdn[1] if gdn else 0, sparse[0] if sparse else 0, sparse[1] if sparse else 0, router)

    def cb(done, total, unit, secs, status, _user):
        if progress:
            print(f"natsl: warmup [{done}/{total}] {unit.decode()} {secs:.1f} s" + ("" if status == 0 else f" FAILED ({C.STATUS_NAMES[status]})"), flush=True)

    fn = C.PROGRESS_FN(cb)
    C.check(C.lib().natsl_runtime_warmup(runtime(device), ctypes.byref(m), fn, None))
