// prefill_wgmma.cuh: block-sparse flash softmax prefill on sm_90a wgmma.
//
// Same work split, list walk, masking and results as sparse_prefill (prefill.cuh):
// one CTA per (64-row query chunk, query head). The CTA is one warpgroup
// (4 warps x 16 rows); S = Q K^T is wgmma m64n64k16 with Q and K from shared
// memory, O += P V takes P from registers (the S accumulators, rounded to the
// activation dtype) and V from shared memory (MN-major). K/V tiles land through
// cp.async in a ring of STAGES (K, V) slots: block i+STAGES-1 loads while block
// i computes. Several CTAs per SM keep the tensor cores busy while one does its
// softmax. Tiles use the sw128 layout (wgmma.cuh).
#pragma once
#include "sparse/prefill.cuh"
#include "common/wgmma.cuh"
#include "common/sm90.cuh"

namespace natsl {
namespace sparse {

#if NATSL_SM90A

template <int DK, int DV, int STAGES>
struct WgmmaSmem {
    static constexpr int Q = 0;                                 // [64][DK] sw128
    static constexpr int K = Q + 64 * DK * 2;                   // STAGES x [64][DK]
    static constexpr int V = K + STAGES * 64 * DK * 2;          // STAGES x [64][DV]; the O tile at the end
    static constexpr int KSCALE = V + STAGES * 64 * DV * 2;     // STAGES x [64] f32 1/rms(k)
    static constexpr int BYTES = KSCALE + STAGES * 64 * 4 + 1024;  // + alignment slack
};

// Async copy of `rows` rows x D columns into a sw128 [ROWS][D] tile (zero fill past `valid`).
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile_sw128(T* tile, const T* src, long long stride, int valid, int tid) {
    constexpr int CPR = D / 8;
#pragma unroll
    for (int i = tid; i < ROWS * CPR; i += THREADS) {
        const int r = i / CPR, c = (i % CPR) * 8;
        const bool ok = r < valid;
        const T* g = ok ? src + (long long)r * stride + c : src;
        cp_async16(tile + sw128<ROWS>(r, c), g, ok ? 16 : 0);
    }
}

// Sum of squares of a row of a sw128 [ROWS][D] tile, GROUP = THREADS / ROWS threads per row.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ float row_sumsq_sw128(const T* tile, int tid, int* row_out) {
    constexpr int GROUP = THREADS / ROWS;
    static_assert(GROUP >= 1 && GROUP <= 32 && (GROUP & (GROUP - 1)) == 0, "row group");
    const int row = tid / GROUP, part = tid % GROUP;
    constexpr int COLS = D / GROUP;
    float ss = 0.f;
#pragma unroll
    for (int c = part * COLS; c < (part + 1) * COLS; c += 8) {
        vec8 v = *reinterpret_cast<const vec8*>(tile + sw128<ROWS>(row, c));
        float f[8];
        unpack8<T>(v, f);
#pragma unroll
        for (int i = 0; i < 8; ++i) ss += f[i] * f[i];
    }
#pragma unroll
    for (int o = GROUP / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    *row_out = row;
    return ss;
}

// fold_q_norm (flash.cuh) on a sw128 tile.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void fold_q_norm_sw128(T* tile, const T* wq, const T* wk, float eps, int tid) {
    constexpr int GROUP = THREADS / ROWS;
    int row;
    const float ss = row_sumsq_sw128<T, D, ROWS, THREADS>(tile, tid, &row);
    const float inv = wq ? rsqrtf(ss / (float)D + eps) : 1.f;
    const int part = tid % GROUP;
    constexpr int COLS = D / GROUP;
#pragma unroll
    for (int c = part * COLS; c < (part + 1) * COLS; c += 8) {
        vec8* p = reinterpret_cast<vec8*>(tile + sw128<ROWS>(row, c));
        float f[8];
        unpack8<T>(*p, f);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float x = f[i] * inv;
            if (wq) x *= to_f32(wq[c + i]);
            if (wk) x *= to_f32(wk[c + i]);
            f[i] = x;
        }
        vec8 o;
#pragma unroll
        for (int i = 0; i < 4; ++i) o.w[i] = pack2<T>(f[2 * i], f[2 * i + 1]);
        *p = o;
    }
}

template <typename T, int DK, int DV, int STAGES>
__device__ void sparse_prefill_wgmma(const NatslSparsePrefillParams& p) {
    static_assert(DK % 64 == 0 && DV % 64 == 0 && DK <= 256 && DV <= 256, "head dims");
    static_assert(STAGES >= 2, "ring");
    constexpr int THREADS = 128;
    constexpr int PANEL = 64 * 64 * 2;  // bytes of one 64-column panel of a 64-row tile
    using S = WgmmaSmem<DK, DV, STAGES>;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // Align the carve-out to 1024 bytes (the swizzle atoms are address-based).
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

    const T* qg = reinterpret_cast<const T*>(p.q) + (i64)(seq0 + c * 64) * p.q_stride_t + (i64)j * p.q_stride_h;
    const T* kg = reinterpret_cast<const T*>(p.k) + (i64)seq0 * p.k_stride_t + (i64)kvh * p.k_stride_h;
    const T* vg = reinterpret_cast<const T*>(p.v) + (i64)seq0 * p.v_stride_t + (i64)kvh * p.v_stride_h;
    auto load_kv = [&](int b, int stage) {
        T* sk = reinterpret_cast<T*>(smem + S::K + stage * 64 * DK * 2);
        T* sv = reinterpret_cast<T*>(smem + S::V + stage * 64 * DV * 2);
        load_tile_sw128<T, DK, 64, THREADS>(sk, kg + (i64)b * 64 * p.k_stride_t, p.k_stride_t, len - b * 64, tid);
        load_tile_sw128<T, DV, 64, THREADS>(sv, vg + (i64)b * 64 * p.v_stride_t, p.v_stride_t, len - b * 64, tid);
    };

    const T* wq = reinterpret_cast<const T*>(p.q_norm_w);
    const T* wk = reinterpret_cast<const T*>(p.k_norm_w);

    // Prologue: Q with the first block, then blocks 1 .. STAGES-2 (one cp.async group each).
    // Two walks over the list: `it` (computed) follows `ft` (fetched), which reports the
    // faults of the positions after the first.
    int itop = -1, ib = 0;
    int it = w.next_valid(0, itop, ib, p.faults);
    int ft = it, ftop = itop, fb = ib;  // next list position to fetch
    load_tile_sw128<T, DK, 64, THREADS>(sq, qg, p.q_stride_t, q_rows, tid);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (ft < total) {
            load_kv(fb, s);
            ft = w.next_valid(ft + 1, ftop, fb, p.faults);
        }
        cp_async_commit();
    }
    if (wq || wk) {
        cp_async_wait<STAGES - 2>();  // Q (first group) has landed
        __syncthreads();
        fold_q_norm_sw128<T, DK, 64, THREADS>(sq, wq, wk, p.norm_eps, tid);
    }

    float o[DV / 8][4];
#pragma unroll
    for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};
    const int row_a = warp * 16 + (lane >> 2);

    int stage = 0;
#pragma unroll 1
    while (it < total) {
        const int b = ib;
        cp_async_wait<STAGES - 2>();  // block `it` (and Q) landed for this thread
        fence_proxy_async();          // ... and is visible to the tensor cores
        __syncthreads();              // for every thread; every thread is done with block it-1
        {
            // Refill the slot block it-1 used with the block STAGES-1 ahead.
            const int fs = (stage + STAGES - 1) % STAGES;
            if (ft < total) {
                load_kv(fb, fs);
                ft = w.next_valid(ft + 1, ftop, fb, p.faults);
            }
            cp_async_commit();
        }
        const u32 k_addr = sbase + S::K + stage * 64 * DK * 2;
        const u32 v_addr = sbase + S::V + stage * 64 * DV * 2;
        float* kscale = kscale_all + stage * 64;
        if (wk) {
            int r;
            const T* sk = reinterpret_cast<const T*>(smem + S::K + stage * 64 * DK * 2);
            const float ss = row_sumsq_sw128<T, DK, 64, THREADS>(sk, tid, &r);
            if ((tid & 1) == 0) kscale[r] = rsqrtf(ss / (float)DK + p.norm_eps);
            __syncthreads();
        }

        // S = Q K^T
        float s[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        wg_fence();
        const unsigned long long qd = wg_desc(sbase + S::Q), kd = wg_desc(k_addr);
#pragma unroll
        for (int ks = 0; ks < DK / 16; ++ks) {
            const u32 off = (ks >> 2) * PANEL + (ks & 3) * 32;
            wgmma_ss<T, 64, 0>(s, wg_desc_add(qd, off), wg_desc_add(kd, off), ks > 0);
        }
        wg_commit();
        wg_wait<0>();
        wg_hold(s);

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
        online_softmax<8, DV / 8>(s, o, m, l);

        // O += P V, one 64-column panel of V at a time.
        u32 pa[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        }
#pragma unroll
        for (int pn = 0; pn < DV / 64; ++pn) wg_hold(o + pn * 8);
        wg_fence();
        const unsigned long long vd = wg_desc(v_addr);
#pragma unroll
        for (int pn = 0; pn < DV / 64; ++pn) {
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                // 16 keys = two 8-row groups (SBO 1024) of panel pn.
                wgmma_rs<T, 64, 1>(o + pn * 8, pa[kk], wg_desc_add(vd, pn * PANEL + kk * 16 * 128), 1);
            }
        }
        wg_commit();
        wg_wait<0>();
#pragma unroll
        for (int pn = 0; pn < DV / 64; ++pn) wg_hold(o + pn * 8);

        it = w.next_valid(it + 1, itop, ib, nullptr);
        stage = (stage + 1) % STAGES;
    }
    cp_async_wait<0>();

    __syncthreads();  // every thread is done with the V slots
    store_prefill_output<T, DV, THREADS>(p, w, o, l, m, reinterpret_cast<T*>(smem + S::V), row_a);
}

#endif  // NATSL_SM90A

} // namespace sparse
} // namespace natsl
