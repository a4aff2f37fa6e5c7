"""The torch custom ops on a GPU (skipped without torch or a CUDA device):
sparse prefill with every chunk routed ATTN against torch SDPA (dense causal),
GDN prefill against an f64 token recurrence of SPEC.md section 4, torch.compile
and a CUDA graph over the ops. Run: pytest python/tests (after building the C ABI)."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    print("skipped: no CUDA device")
    pytest.skip("skipped: no CUDA device", allow_module_level=True)

import natsl.torch_ops as ops  # noqa: E402


def cu_of(lens):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return cu, torch.tensor(cu, dtype=torch.int32, device="cuda")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dk,dv", [(64, 128), (128, 128)])
def test_sparse_prefill_dense_lists_match_sdpa(dk, dv):
    torch.manual_seed(0)
    lens = [300, 64, 1000]
    cu, cu_d = cu_of(lens)
    hq, hkv, hr = 8, 2, 2
    T = cu[-1]
    q = torch.randn(T, hq, dk, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, hkv, dk, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(T, hkv, dv, device="cuda", dtype=torch.bfloat16)
    lst, cnt = ops.dense_lists(cu, hr, "cuda")
    o, lse = ops.sparse_prefill(q, k, v, lst, cnt, cu_d, cu)
    for s in range(len(lens)):
        a, b = cu[s], cu[s + 1]
        qs = q[a:b].transpose(0, 1).float()
        ks = k[a:b].repeat_interleave(hq // hkv, dim=1).transpose(0, 1).float()
        vs = v[a:b].repeat_interleave(hq // hkv, dim=1).transpose(0, 1).float()
        want = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
        assert rel(o[a:b], want) < 2e-2, f"sequence {s}: rel err {rel(o[a:b], want):.2e}"
        scores = (qs @ ks.transpose(1, 2)) / math.sqrt(dk)
        mask = torch.ones(b - a, b - a, device="cuda", dtype=torch.bool).tril()
        want_lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1).transpose(0, 1)
        assert rel(lse[a:b], want_lse) < 1e-3


def gdn_reference(q, k, v, g, beta, cu, scale, l2norm):
    """SPEC.md section 4 token by token in f64 (every chunk GDN, zero initial state)."""
    q, k, v, g, beta = (x.double().cpu() for x in (q, k, v, g, beta))
    T, hqk, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    if l2norm:
        q = q / (q.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
        k = k / (k.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    o = torch.zeros(T, hv, dv, dtype=torch.float64)
    states = torch.zeros(len(cu) - 1, hv, dk, dv, dtype=torch.float64)
    for s in range(len(cu) - 1):
        for h in range(hv):
            j = h // (hv // hqk)
            S = torch.zeros(dk, dv, dtype=torch.float64)
            for t in range(cu[s], cu[s + 1]):
                S = math.exp(g[t, h]) * S
                u = beta[t, h] * (v[t, h] - S.T @ k[t, j])
                S = S + torch.outer(k[t, j], u)
                o[t, h] = scale * (S.T @ q[t, j])
            states[s, h] = S
    return o, states


def test_gdn_prefill_matches_the_f64_recurrence():
    torch.manual_seed(1)
    lens = [130, 64, 77]
    cu, cu_d = cu_of(lens)
    T, hqk, hv, dk, dv = cu[-1], 1, 2, 64, 64
    q = torch.randn(T, hqk, dk, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, hqk, dk, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(T, hv, dv, device="cuda", dtype=torch.bfloat16)
    g = -torch.rand(T, hv, device="cuda") * 0.2
    beta = torch.rand(T, hv, device="cuda")
    o, state = ops.gdn_prefill(q, k, v, g, beta, cu_d, cu, l2norm=True, output_state=True)
    want_o, want_s = gdn_reference(q, k, v, g, beta, cu, 1 / math.sqrt(dk), True)
    assert rel(o.cpu(), want_o) < 2e-2, rel(o.cpu(), want_o)
    assert rel(state.cpu(), want_s) < 1e-2, rel(state.cpu(), want_s)


def test_ops_under_torch_compile_and_a_cuda_graph():
    torch.manual_seed(2)
    cu, cu_d = cu_of([256, 128])
    T, hq, hkv, hr, dk, dv = cu[-1], 4, 2, 2, 64, 128
    q = torch.randn(T, hq, dk, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, hkv, dk, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(T, hkv, dv, device="cuda", dtype=torch.bfloat16)
    lst, cnt = ops.dense_lists(cu, hr, "cuda")
    eager, _ = ops.sparse_prefill(q, k, v, lst, cnt, cu_d, cu)

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        o, _ = ops.sparse_prefill(q * 1.0, k, v, lst, cnt, cu_d, cu)
        return o + 0

    assert torch.equal(f(q, k, v), eager)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up off the default stream, as graphs require
        ops.sparse_prefill(q, k, v, lst, cnt, cu_d, cu)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = ops.sparse_prefill(q, k, v, lst, cnt, cu_d, cu)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
