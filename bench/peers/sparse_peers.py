#!/usr/bin/env python3
"""Peers of the natsl sparse softmax on the shapes of benches/sparse.rs.

torch SDPA (FLASH_ATTENTION = FA2, CUDNN_ATTENTION) on dense causal shapes, and
FlexAttention with a BlockMask equivalent to the NAtS-L routed pattern (query
chunk c sees ATTN chunks c' < c of its routing head, plus itself causally).
Median of CUDA-event timings of CUDA-graph replays after warm-up (as natsl). Prints a table; appends JSON lines
to the path given on the command line.

    python bench/peers/sparse_peers.py bench/results/sparse-peers.jsonl [filter...]
"""
import json
import sys
import time

import torch
import torch.nn.functional as F

PEAK = 771.0
C = 64


REPS = 8  # calls per graph replay, as natsl's bench::time_it


def median_ms(fn, warmup=3, iters=10):
    """Median ms per call over CUDA-graph replays of REPS calls (natsl is timed the same
    way); eager per-call events if the peer cannot be captured (then marked)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    graph = None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(REPS):
                fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - timed eagerly instead
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:80]}; timing eagerly)", flush=True)
        graph = None
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        if graph is not None:
            graph.replay()
        else:
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / (REPS if graph is not None else 1))
    times.sort()
    return times[len(times) // 2], graph is not None


def labels_for(n_chunks, hr, frac, seed=9):
    """Exactly round(frac * complete chunks) ATTN chunks per routing head, at random."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.zeros(hr, n_chunks, dtype=torch.bool)
    k = round(frac * n_chunks)
    for h in range(hr):
        lab[h, torch.randperm(n_chunks, generator=g)[:k]] = True
    return lab


def visible_pairs(lab, T, hq):
    hr, nch = lab.shape
    pairs = 0
    for h in range(hr):
        before = torch.cumsum(lab[h].long(), 0) - lab[h].long()  # ATTN chunks strictly before c
        rows = torch.clamp(T - torch.arange(nch) * C, max=C)
        pairs += (hq // hr) * int((rows * before * C + rows * (rows + 1) // 2).sum())
    return pairs


def sdpa(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def flex(q, k, v, lab_dev, hq, hr, block):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    G = hq // hr

    def mask_mod(b, h, q_idx, kv_idx):
        qc = q_idx // C
        kc = kv_idx // C
        own = (qc == kc) & (kv_idx <= q_idx)
        earlier = (kc < qc) & lab_dev[h // G, kc]
        return own | earlier

    T = q.shape[2]
    bm = create_block_mask(mask_mod, B=None, H=hq, Q_LEN=T, KV_LEN=T, BLOCK_SIZE=block)
    fa = torch.compile(flex_attention)
    return lambda: fa(q, k, v, block_mask=bm)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "bench/results/sparse-peers.jsonl"
    filters = sys.argv[2:]
    want = lambda name: not filters or any(f in name for f in filters)
    from torch.nn.attention import SDPBackend

    dev = "cuda"
    dt = torch.bfloat16
    gpu = torch.cuda.get_device_name()
    date = time.strftime("%Y-%m-%d", time.gmtime())
    recs = []

    def record(op, shape, peer, timed, flops):
        ms, graphed = timed
        peer = peer if graphed else peer + " (eager)"
        tf = flops / (ms * 1e-3) / 1e12 if ms else 0.0
        r = dict(op=op, shape=shape, variant=peer, ms=ms, flops=flops, tflops=tf, pct_peak=100 * tf / PEAK, gpu=gpu, date=date, torch=torch.__version__, timing="graph" if graphed else "eager")
        recs.append(r)
        print(f"{shape:<44} {peer:<22} {ms:>9.4f} ms {tf:>7.1f} TFLOP/s {100 * tf / PEAK:>5.1f}%", flush=True)

    def attempt(shape, peer, flops, make):
        try:
            record("sparse_prefill", shape, peer, median_ms(make()), flops)
        except Exception as e:  # a peer that does not support the shape says so
            print(f"{shape:<44} {peer:<22} unsupported: {type(e).__name__}: {str(e)[:120]}", flush=True)

    # Dense causal B8 H16 T8192 d128.
    name = "prefill dense causal B8 H16 T8192 d128"
    if want(name):
        B, H, T, D = 8, 16, 8192, 128
        q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dt) for _ in range(3))
        flops = B * H * T * (T + 1) / 2 * 2 * (D + D)
        attempt(name, "sdpa-flash", flops, lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION))
        attempt(name, "sdpa-cudnn", flops, lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION))
        lab = torch.ones(H, T // C, dtype=torch.bool, device=dev)
        for blk in (128, 64):
            attempt(name, f"flex-block{blk}", flops, lambda: flex(q, k, v, lab, H, H, blk))
        del q, k, v

    # NAtS-L heads: 12 heads 64/128, 6 routing heads, T 32768.
    T, H, HR, DK, DV = 32768, 12, 6, 64, 128
    q = torch.randn(1, H, T, DK, device=dev, dtype=dt)
    k = torch.randn(1, H, T, DK, device=dev, dtype=dt)
    v = torch.randn(1, H, T, DV, device=dev, dtype=dt)
    for frac in (1.0, 0.4, 0.3, 0.25, 0.1):
        name = f"prefill natsl 12h 64/128 T32768 rho {frac}"
        if not want(name):
            continue
        lab = labels_for(T // C, HR, frac)
        flops = visible_pairs(lab, T, H) * 2 * (DK + DV)
        if frac == 1.0:
            attempt(name, "sdpa-flash", flops, lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION))
            attempt(name, "sdpa-cudnn", flops, lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION))
        lab_dev = lab.to(dev)
        for blk in (128, 64):
            attempt(name, f"flex-block{blk}", flops, lambda: flex(q, k, v, lab_dev, H, HR, blk))

    # The length sweep of `natsl bench sparse` (rho 0.25; its PNG draws these beside natsl's).
    del q, k, v
    for T in (4096, 8192, 16384, 32768, 65536):
        name = f"prefill natsl 12h 64/128 T{T} rho 0.25 sweep"
        if not want(name):
            continue
        q = torch.randn(1, H, T, DK, device=dev, dtype=dt)
        k = torch.randn(1, H, T, DK, device=dev, dtype=dt)
        v = torch.randn(1, H, T, DV, device=dev, dtype=dt)
        lab = labels_for(T // C, HR, 0.25)
        flops = visible_pairs(lab, T, H) * 2 * (DK + DV)
        lab_dev = lab.to(dev)
        attempt(name, "flex-block128", flops, lambda: flex(q, k, v, lab_dev, H, HR, 128))
        del q, k, v

    with open(out, "a") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(recs)} records to {out}")


if __name__ == "__main__":
    main()
