// prefill.cuh: block-sparse flash softmax prefill (FlashAttention-2 style on mma.sync).
//
// One CTA per (64-row query chunk, query head); 4 warps x 16 query rows. The
// query chunk is one routing chunk, so every CTA's key set is "a list of whole
// 64-key blocks + its own block causally": the own (diagonal) block first, then
// the listed blocks. Per KV block: K lands (cp.async) while the previous PV
// runs, V lands while QK^T and the softmax run (one buffer each, FA2's overlap).
// Grid order: latest chunks (heaviest) first, heads fastest (GQA heads that
// share K/V run side by side and share it through L2).
#pragma once
#include "sparse/flash.cuh"
#include "sparse/prefill_work.cuh"

namespace natsl {
namespace sparse {

template <int DK, int DV>
struct PrefillSmem {
    static constexpr int Q = 0;                      // [64][DK]
    static constexpr int K = Q + 64 * DK * 2;        // [64][DK]
    static constexpr int V = K + 64 * DK * 2;        // [64][DV]; the O tile at the end
    static constexpr int KSCALE = V + 64 * DV * 2;   // [64] f32 1/rms(k)
    static constexpr int BYTES = KSCALE + 64 * 4;
};

// Epilogue of every prefill kernel: normalise O by the row sums, write the lse,
// stage O in `so` (swizzled; no thread may still read it) and store the chunk's
// rows with 16-byte writes.
template <typename T, int DV, int THREADS>
__device__ __forceinline__ void store_prefill_output(const NatslSparsePrefillParams& p, const PrefillWork& w, float (&o)[DV / 8][4],
                                                     float (&l)[2], const float (&m)[2], T* so, int row_a) {
    const int tid = threadIdx.x, lane = tid & 31;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    const float inv0 = l[0] > 0.f ? 1.f / l[0] : 0.f;
    const float inv1 = l[1] > 0.f ? 1.f / l[1] : 0.f;
#pragma unroll
    for (int ot = 0; ot < DV / 8; ++ot) {
        const int col = ot * 8 + 2 * (lane & 3);
        *reinterpret_cast<u32*>(so + swz<DV>(row_a, col)) = pack2<T>(o[ot][0] * inv0, o[ot][1] * inv0);
        *reinterpret_cast<u32*>(so + swz<DV>(row_a + 8, col)) = pack2<T>(o[ot][2] * inv1, o[ot][3] * inv1);
    }
    const i64 t0 = w.seq0 + w.c * 64;
    if (p.lse && (lane & 3) == 0) {
        if (row_a < w.q_rows) p.lse[(t0 + row_a) * p.lse_stride_t + w.j] = l[0] > 0.f ? (m[0] + __log2f(l[0])) * kLn2 : neg_inf();
        if (row_a + 8 < w.q_rows) p.lse[(t0 + row_a + 8) * p.lse_stride_t + w.j] = l[1] > 0.f ? (m[1] + __log2f(l[1])) * kLn2 : neg_inf();
    }
    __syncthreads();
    T* og = reinterpret_cast<T*>(p.o) + t0 * p.o_stride_t + (i64)w.j * p.o_stride_h;
    constexpr int CPR = DV / 8;
#pragma unroll
    for (int i = tid; i < 64 * CPR; i += THREADS) {
        const int r = i / CPR, col = (i % CPR) * 8;
        if (r < w.q_rows) *reinterpret_cast<vec8*>(og + (i64)r * p.o_stride_t + col) = *reinterpret_cast<const vec8*>(so + swz<DV>(r, col));
    }
}

template <typename T, int DK, int DV, int WARPS>
__device__ void sparse_prefill(const NatslSparsePrefillParams& p) {
    static_assert(WARPS == 4, "4 warps x 16 rows = one 64-row chunk");
    static_assert(DK % 64 == 0 && DV % 64 == 0 && DK <= 256 && DV <= 256, "head dims");
    constexpr int THREADS = WARPS * 32;
    constexpr bool Q_REGS = DK <= 128;  // d 256 re-reads Q from smem (registers go to O)
    constexpr int NSUB = DK + DV > 256 ? 2 : 1;  // key sub-blocks per 64-key block
    constexpr int NT = 8 / NSUB;                 // 8-key n tiles per sub-block
    using S = PrefillSmem<DK, DV>;
    extern __shared__ __align__(128) unsigned char smem[];
    T* sq = reinterpret_cast<T*>(smem + S::Q);
    T* sk = reinterpret_cast<T*>(smem + S::K);
    T* sv = reinterpret_cast<T*>(smem + S::V);
    float* kscale = reinterpret_cast<float*>(smem + S::KSCALE);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    PrefillWork w;
    if (!w.init(p)) return;
    const int j = w.j, c = w.c, seq0 = w.seq0, len = w.len, kvh = w.kvh, q_rows = w.q_rows;
    const int total = w.total;

    const T* qg = reinterpret_cast<const T*>(p.q) + (i64)(seq0 + c * 64) * p.q_stride_t + (i64)j * p.q_stride_h;
    const T* kg = reinterpret_cast<const T*>(p.k) + (i64)seq0 * p.k_stride_t + (i64)kvh * p.k_stride_h;
    const T* vg = reinterpret_cast<const T*>(p.v) + (i64)seq0 * p.v_stride_t + (i64)kvh * p.v_stride_h;
    auto load_k = [&](int b) { load_tile<T, DK, 64, THREADS>(sk, kg + (i64)b * 64 * p.k_stride_t, p.k_stride_t, len - b * 64, tid); };
    auto load_v = [&](int b) { load_tile<T, DV, 64, THREADS>(sv, vg + (i64)b * 64 * p.v_stride_t, p.v_stride_t, len - b * 64, tid); };

    const T* wq = reinterpret_cast<const T*>(p.q_norm_w);
    const T* wk = reinterpret_cast<const T*>(p.k_norm_w);

    int top = -1, nb = 0;  // the list walk's running maximum, the next block
    int it = w.next_valid(0, top, nb, p.faults);
    load_tile<T, DK, 64, THREADS>(sq, qg, p.q_stride_t, q_rows, tid);
    if (it < total) load_k(nb);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (wq || wk) {
        fold_q_norm<T, DK, 64, THREADS>(sq, wq, wk, p.norm_eps, tid);
        __syncthreads();
    }
    u32 qa[Q_REGS ? DK / 16 : 1][4];
    if (Q_REGS) load_q_frags<T, DK>(qa, sq, warp * 16, lane);

    float o[DV / 8][4];
#pragma unroll
    for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};
    const int row_a = warp * 16 + (lane >> 2);  // the thread's rows: row_a, row_a + 8

    while (it < total) {
        const int b = nb;
        load_v(b);
        cp_async_commit();
        cp_async_wait<1>();  // K(b) has landed; V(b) may be in flight
        __syncthreads();
        if (wk) {
            int r;
            const float ss = row_sumsq<T, DK, 64, THREADS>(sk, tid, &r);
            if ((tid & 1) == 0) kscale[r] = rsqrtf(ss / (float)DK + p.norm_eps);
            __syncthreads();
        }
        // d 256: the 64-key block in two 32-key halves (S registers go to O).
        const bool diag = b == c;
        int nit = 0;
#pragma unroll 1
        for (int sub = 0; sub < NSUB; ++sub) {
            float s[NT][4];
#pragma unroll
            for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
            qk_tile<T, DK, NT, Q_REGS>(s, qa, sq, warp * 16, sk, sub * NT * 8, lane);
            float ks[NT][2];
            if (wk) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    ks[nt][0] = kscale[sub * NT * 8 + nt * 8 + 2 * (lane & 3)];
                    ks[nt][1] = kscale[sub * NT * 8 + nt * 8 + 2 * (lane & 3) + 1];
                }
            }
            if (sub == NSUB - 1) {
                nit = w.next_valid(it + 1, top, nb, p.faults);
                __syncthreads();  // every warp is done with K(b)
                if (nit < total) load_k(nb);
                cp_async_commit();
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = sub * NT * 8 + nt * 8 + 2 * (lane & 3) + (e & 1);
                    const int row = row_a + (e >> 1) * 8;
                    float x = s[nt][e] * (wk ? ks[nt][e & 1] : 1.f) * p.scale_log2;
                    if (diag && key > row) x = neg_inf();
                    s[nt][e] = x;
                }
            }
            online_softmax<NT, DV / 8>(s, o, m, l);
            if (sub == 0) {
                // V(b) has landed (K(next) may be in flight when it was issued above).
                if (NSUB == 1) cp_async_wait<1>(); else cp_async_wait<0>();
                __syncthreads();
            }
            pv_tile<T, DV, NT / 2>(o, s, sv, sub * NT * 8, lane);
        }
        __syncthreads();  // every warp is done with V(b)
        it = nit;
    }

    store_prefill_output<T, DV, THREADS>(p, w, o, l, m, sv, row_a);
}

} // namespace sparse
} // namespace natsl
