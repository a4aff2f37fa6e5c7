"""One row of natsl's GDN benchmark from Python: P1 (8 x 8192 tokens, 16 q/k and
16 value heads, dk = dv = 128, bf16, l2norm in the kernel, f32 g and beta), GPU time
of `natsl::gdn_prefill` from CUDA events over graph replays, next to fla's
chunk_gated_delta_rule when fla is installed. README / bench/NOTES.md: natsl P1
1.28 ms on the H200 (`cargo bench --bench gdn`); this adds the torch op's host cost
only outside the graph.

    python python/examples/bench_gdn_p1.py
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import natsl.torch_ops as ops  # noqa: E402


def time_graph(fn, iters=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def main():
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return
    torch.manual_seed(0)
    n, L, hqk, hv, d = 8, 8192, 16, 16, 128
    T = n * L
    cu = [i * L for i in range(n + 1)]
    cu_d = torch.tensor(cu, dtype=torch.int32, device="cuda")
    q = torch.randn(T, hqk, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, hqk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(T, hv, d, device="cuda", dtype=torch.bfloat16)
    g = -torch.rand(T, hv, device="cuda") * 0.1
    beta = torch.rand(T, hv, device="cuda")
    ops.warmup(gdn=(128, 128), sparse=None, router=0)
    ms = time_graph(lambda: ops.gdn_prefill(q, k, v, g, beta, cu_d, cu, l2norm=True))
    print(f"P1 8x8192 16/16  natsl::gdn_prefill  {ms:.3f} ms")
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        print("fla not installed: no peer row")
        return
    cu64 = cu_d.long()
    fla = lambda: chunk_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None], cu_seqlens=cu64, use_qk_l2norm_in_kernel=True)  # noqa: E731
    ms_fla = time_graph(fla)
    print(f"P1 8x8192 16/16  fla chunk_gated_delta_rule  {ms_fla:.3f} ms  (natsl {ms_fla / ms:.2f}x)")


if __name__ == "__main__":
    main()
