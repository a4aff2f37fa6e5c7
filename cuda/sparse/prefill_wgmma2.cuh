// prefill_wgmma2.cuh: block-sparse flash softmax prefill on sm_90a wgmma with
// intra-warpgroup pipelining (entry prefill_wgmma2; PrefillKernel::WgmmaPipelined).
//
// Same work split, list walk, masking, smem tiles and results as
// sparse_prefill_wgmma (prefill_wgmma.cuh): one CTA = one warpgroup per
// (64-row query chunk, query head). The difference is the schedule. Block i's
// S_i = Q K_i^T and the previous block's O += P_{i-1} V_{i-1} are issued back to
// back as two wgmma groups; the warpgroup waits only for the first
// (wait_group 1), then does block i's mask / max / exp2 / row sums while the
// tensor cores still run P_{i-1} V_{i-1}. Only the O rescale and the P pack
// wait for the PV group. So each step costs max(softmax, PV) + QK instead of
// QK + softmax + PV, on top of the overlap between the 2 CTAs per SM.
//
// K and V have separate 2-slot rings (same smem as the 2-stage wgmma kernel):
// at step n (the n-th visible block) K_n sits in K slot n&1 and V_{n-1} in V
// slot (n-1)&1; the step loads K_{n+1} into K slot (n+1)&1 (K_{n-1}'s, whose QK
// finished at step n-1) and V_n into V slot n&1 (V_{n-2}'s, whose PV finished at
// step n-1), one cp.async group per step.
#pragma once
#include "sparse/prefill_wgmma.cuh"

namespace natsl {
namespace sparse {

#if NATSL_SM90A

// Keep the P fragments alive (and unmodified) until the PV wgmma that reads them
// has been waited on, so ptxas never reuses their registers under an async read.
__device__ __forceinline__ void wg_hold_a(u32 (*a)[4]) {
    asm volatile("" : "+r"(a[0][0]), "+r"(a[0][1]), "+r"(a[0][2]), "+r"(a[0][3]),
        "+r"(a[1][0]), "+r"(a[1][1]), "+r"(a[1][2]), "+r"(a[1][3]),
        "+r"(a[2][0]), "+r"(a[2][1]), "+r"(a[2][2]), "+r"(a[2][3]),
        "+r"(a[3][0]), "+r"(a[3][1]), "+r"(a[3][2]), "+r"(a[3][3]) :: "memory");
}

template <typename T, int DK, int DV>
__device__ void sparse_prefill_wgmma2(const NatslSparsePrefillParams& p) {
    static_assert(DK % 64 == 0 && DV % 64 == 0 && DK <= 256 && DV <= 256, "head dims");
    constexpr int THREADS = 128;
    constexpr int PANEL = 64 * 64 * 2;  // bytes of one 64-column panel of a 64-row tile
    using S = WgmmaSmem<DK, DV, 2>;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 raw_addr = smem_u32(smem_raw);
    unsigned char* smem = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
    const u32 sbase = smem_u32(smem);
    T* sq = reinterpret_cast<T*>(smem + S::Q);
    float* kscale_all = reinterpret_cast<float*>(smem + S::KSCALE);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    PrefillWork w;
    if (!w.init(p)) return;
    const int j = w.j, c = w.c, seq0 = w.seq0, len = w.len, kvh = w.kvh, q_rows = w.q_rows;
    const int total = w.total;
    auto block_at = [&](int it) { return w.block_at(it); };
    auto next_valid = [&](int it) { return w.next_valid(it); };

    const T* qg = reinterpret_cast<const T*>(p.q) + (i64)(seq0 + c * 64) * p.q_stride_t + (i64)j * p.q_stride_h;
    const T* kg = reinterpret_cast<const T*>(p.k) + (i64)seq0 * p.k_stride_t + (i64)kvh * p.k_stride_h;
    const T* vg = reinterpret_cast<const T*>(p.v) + (i64)seq0 * p.v_stride_t + (i64)kvh * p.v_stride_h;
    auto load_k = [&](int b, int slot) {
        T* sk = reinterpret_cast<T*>(smem + S::K + slot * 64 * DK * 2);
        load_tile_sw128<T, DK, 64, THREADS>(sk, kg + (i64)b * 64 * p.k_stride_t, p.k_stride_t, len - b * 64, tid);
    };
    auto load_v = [&](int b, int slot) {
        T* sv = reinterpret_cast<T*>(smem + S::V + slot * 64 * DV * 2);
        load_tile_sw128<T, DV, 64, THREADS>(sv, vg + (i64)b * 64 * p.v_stride_t, p.v_stride_t, len - b * 64, tid);
    };

    const T* wq = reinterpret_cast<const T*>(p.q_norm_w);
    const T* wk = reinterpret_cast<const T*>(p.k_norm_w);

    // Prologue: Q and the first block's K (one group).
    int it = next_valid(0);
    load_tile_sw128<T, DK, 64, THREADS>(sq, qg, p.q_stride_t, q_rows, tid);
    if (it < total) load_k(block_at(it), 0);
    cp_async_commit();
    if (wq || wk) {
        cp_async_wait<0>();
        __syncthreads();
        fold_q_norm_sw128<T, DK, 64, THREADS>(sq, wq, wk, p.norm_eps, tid);
    }

    float o[DV / 8][4];
#pragma unroll
    for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};
    const int row_a = warp * 16 + (lane >> 2);
    u32 pa[4][4];  // P of the previous block (A fragments of the PV wgmma)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) pa[kk][0] = pa[kk][1] = pa[kk][2] = pa[kk][3] = 0u;

    auto issue_pv = [&](int vslot) {
        const u32 v_addr = sbase + S::V + vslot * 64 * DV * 2;
#pragma unroll
        for (int pn = 0; pn < DV / 64; ++pn) {
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                // 16 keys = two 8-row groups (SBO 1024) of panel pn.
                wgmma_rs<T>(o + pn * 8, pa[kk], wg_desc(v_addr + pn * PANEL + kk * 16 * 128), 1);
            }
        }
        wg_commit();
    };

    int nb = 0;  // visible blocks started so far
#pragma unroll 1
    while (it < total) {
        const int b = block_at(it);
        const int nxt = next_valid(it + 1);
        cp_async_wait<0>();   // K_nb (and V_{nb-1}, Q) landed for this thread
        fence_proxy_async();  // ... and is visible to the tensor cores
        __syncthreads();      // for every thread; every thread is done with step nb-1
        if (nxt < total) load_k(block_at(nxt), (nb + 1) & 1);
        load_v(b, nb & 1);
        cp_async_commit();

        const int kslot = nb & 1;
        const u32 k_addr = sbase + S::K + kslot * 64 * DK * 2;
        float* kscale = kscale_all + kslot * 64;

        // S = Q K^T (group 1), then O += P_{nb-1} V_{nb-1} (group 2).
        float s[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        wg_hold(s);  // keep the zeroing ahead of the fence
#pragma unroll
        for (int pn = 0; pn < DV / 64; ++pn) wg_hold(o + pn * 8);
        wg_hold_a(pa);
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < DK / 16; ++ks) {
            const u32 off = (ks >> 2) * PANEL + (ks & 3) * 32;
            wgmma_ss<T>(s, wg_desc(sbase + S::Q + off), wg_desc(k_addr + off), ks > 0);
        }
        wg_commit();
        if (nb > 0) {
            wg_fence();  // in this basic block (ptxas would inject it); waits for no wgmma
            issue_pv((nb - 1) & 1);
            wg_wait<1>();
        } else {
            wg_wait<0>();
        }
        wg_hold(s);

        if (wk) {
            int r;
            const T* sk = reinterpret_cast<const T*>(smem + S::K + kslot * 64 * DK * 2);
            const float ss = row_sumsq_sw128<T, DK, 64, THREADS>(sk, tid, &r);
            if ((tid & 1) == 0) kscale[r] = rsqrtf(ss / (float)DK + p.norm_eps);
            __syncthreads();
        }

        // Mask, running max, exp2 and row sums of block nb: overlaps the PV wgmma.
        const bool diag = b == c;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = nt * 8 + 2 * (lane & 3) + (e & 1);
                const int row = row_a + (e >> 1) * 8;
                float x = s[nt][e] * (wk ? kscale[key] : 1.f) * p.scale_log2;
                if (diag && key > row) x = neg_inf();
                s[nt][e] = x;
            }
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = neg_inf();
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[r], mx);
            const float m_use = m_new == neg_inf() ? 0.f : m_new;
            alpha[r] = fast_exp2(m[r] - m_use);
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                s[nt][2 * r] = fast_exp2(s[nt][2 * r] - m_use);
                s[nt][2 * r + 1] = fast_exp2(s[nt][2 * r + 1] - m_use);
                sum += s[nt][2 * r] + s[nt][2 * r + 1];
            }
            l[r] = l[r] * alpha[r] + sum;
            m[r] = m_new;
        }

        // The PV group is done: rescale O, and P_nb replaces P_{nb-1}.
        wg_wait<0>();
#pragma unroll
        for (int pn = 0; pn < DV / 64; ++pn) wg_hold(o + pn * 8);
        wg_hold_a(pa);
#pragma unroll
        for (int ot = 0; ot < DV / 8; ++ot) {
            o[ot][0] *= alpha[0];
            o[ot][1] *= alpha[0];
            o[ot][2] *= alpha[1];
            o[ot][3] *= alpha[1];
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        }

        it = nxt;
        ++nb;
    }
    cp_async_wait<0>();
    if (nb > 0) {
        // The last block's PV (its V landed with the last group).
        fence_proxy_async();
        __syncthreads();
#pragma unroll
        for (int pn = 0; pn < DV / 64; ++pn) wg_hold(o + pn * 8);
        wg_hold_a(pa);
        wg_fence();
        issue_pv((nb - 1) & 1);
        wg_wait<0>();
#pragma unroll
        for (int pn = 0; pn < DV / 64; ++pn) wg_hold(o + pn * 8);
        wg_hold_a(pa);
    }

    __syncthreads();  // every thread is done with the V slots
    store_prefill_output<T, DV, THREADS>(p, w, o, l, m, reinterpret_cast<T*>(smem + S::V), row_a);
}

#endif  // NATSL_SM90A

} // namespace sparse
} // namespace natsl
