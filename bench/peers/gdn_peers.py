#!/usr/bin/env python3
"""Peers of the natsl GDN kernels on the shapes of benches/gdn.rs, in the same device call.

fla 0.6.0 (FLA_FLASH_QLA=0): chunk_gated_delta_rule (packed varlen, cu_seqlens, random h0,
final state out) for prefill, fused_recurrent_gated_delta_rule under a CUDA graph for decode.
Median of CUDA-event timings after warm-up. Prints a table; appends JSON lines to argv[1].

    python bench/peers/gdn_peers.py bench/results/gdn-peers.jsonl
"""
import json
import os
import sys
import time

os.environ.setdefault("FLA_FLASH_QLA", "0")
import torch

try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
except Exception as e:  # noqa: BLE001
    print(f"fla unavailable: {e}")
    sys.exit(0)


def median_ms(fn, warmup=3, iters=15):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


PREFILL = [
    ("P1 8x8192 16/16", [8192] * 8, 16, 16, 128, 128),
    ("P2 8x8192 16/32", [8192] * 8, 16, 32, 128, 128),
    ("P3 8x8192 16/64", [8192] * 8, 16, 64, 128, 128),
    ("P4 1x32768 16/32", [32768], 16, 32, 128, 128),
    ("P5 1x32768 2/8", [32768], 2, 8, 128, 128),
    ("P6 1x8192 16/64", [8192], 16, 64, 128, 128),
    ("P7 1024+7168 16/32", [1024, 7168], 16, 32, 128, 128),
    ("P8 1x2048 16/32", [2048], 16, 32, 128, 128),
    ("P9 1x65536 16/32", [65536], 16, 32, 128, 128),
    ("d64 8x8192 16/16", [8192] * 8, 16, 16, 64, 64),
    ("natsl-340M 1x32768 6 128/256", [32768], 6, 6, 128, 256),
    ("natsl-760M 1x32768 6 192/384", [32768], 6, 6, 192, 384),
]
# The length sweeps of `natsl bench gdn` (its PNG draws these beside natsl's).
PREFILL += [(f"natsl-340M 1x{t} 6 128/256 sweep", [t], 6, 6, 128, 256) for t in (4096, 8192, 16384, 32768, 65536)]
PREFILL += [(f"natsl-760M 1x{t} 6 192/384 sweep", [t], 6, 6, 192, 384) for t in (4096, 8192, 16384, 32768, 65536)]


def prefill(name, lens, hqk, hv, dk, dv):
    dev, dt = "cuda", torch.bfloat16
    T, N = sum(lens), len(lens)
    torch.manual_seed(0)
    q = torch.randn(1, T, hqk, dk, device=dev, dtype=dt)
    k = torch.nn.functional.normalize(torch.randn(1, T, hqk, dk, device=dev, dtype=torch.float32), dim=-1).to(dt)
    v = torch.randn(1, T, hv, dv, device=dev, dtype=dt)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, hv, device=dev, dtype=torch.float32)) / 16
    beta = torch.rand(1, T, hv, device=dev, dtype=dt).sigmoid()
    h0 = torch.randn(N, hv, dk, dv, device=dev, dtype=torch.float32)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=dev, dtype=torch.int32)
    if hqk != hv:  # fla 0.6 GVA: repeat q/k per value head group when not supported natively
        try:
            chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu.long())
        except Exception:  # noqa: BLE001
            q = q.repeat_interleave(hv // hqk, dim=2)
            k = k.repeat_interleave(hv // hqk, dim=2)
    fn = lambda: chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu.long())
    ms = median_ms(fn)
    flops = T * hv * (6 * dk * dv + 4 * 64 * (dk + dv))
    return {"op": "gdn_prefill", "peer": "fla-0.6.0", "shape": name, "ms": ms, "tflops": flops / ms / 1e9}


def decode(B, hqk=16, hv=32, d=128):
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, 1, hqk, d, device=dev, dtype=dt)
    k = torch.nn.functional.normalize(torch.randn(B, 1, hqk, d, device=dev), dim=-1).to(dt)
    v = torch.randn(B, 1, hv, d, device=dev, dtype=dt)
    g = torch.nn.functional.logsigmoid(torch.randn(B, 1, hv, device=dev)) / 16
    beta = torch.rand(B, 1, hv, device=dev, dtype=dt)
    pool = torch.randn(B * 2, hv, d, d, device=dev, dtype=torch.float32)
    idx = torch.arange(B, device=dev, dtype=torch.int32) * 2
    h0 = pool[idx.long()]
    kwargs = {}
    if hqk != hv:
        q = q.repeat_interleave(hv // hqk, dim=2)
        k = k.repeat_interleave(hv // hqk, dim=2)
    fn = lambda: fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kwargs)
    fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = median_ms(graph.replay, warmup=5, iters=50)
    return {"op": "gdn_decode", "peer": "fla-0.6.0 (graph)", "shape": f"decode B={B} 16/32 d128", "ms": ms, "tbps": B * hv * d * d * 4 * 2 / ms / 1e9}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else None
    date = time.strftime("%Y-%m-%d")
    gpu = torch.cuda.get_device_name()
    only = sys.argv[2:]  # optional name filters
    jobs = [(s[0], lambda s=s: prefill(*s)) for s in PREFILL] + [(f"decode B={B}", lambda B=B: decode(B)) for B in (1, 32, 128, 512)]
    print(f"{'peer':<20} {'shape':<34} {'ms':>9}", flush=True)
    for name, job in jobs:
        if only and not any(f in name for f in only):
            continue
        try:
            r = job()
        except Exception as e:  # noqa: BLE001
            print(f"{name}: fla failed: {str(e)[:200]}", flush=True)
            continue
        r.update(date=date, gpu=gpu)
        print(f"{r['peer']:<20} {r['shape']:<34} {r['ms']:>9.4f}", flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
