// flash.cuh: building blocks of the sparse flash softmax (prefill and decode):
// swizzled shared-memory tiles, tile loads with zero fill, RMSNorm folding,
// and the warp-level QK^T / online-softmax / PV steps on mma.sync m16n8k16.
//
// Smem tiles are [rows][D] storage elements, D a multiple of 64; the 16-byte
// chunk index within a row is XORed with (row & 7) so that ldmatrix's eight
// row addresses hit eight different bank groups.
#pragma once
#include "common/dtype.cuh"
#include "common/mma_sm80.cuh"

namespace natsl {
namespace sparse {

constexpr float kLn2 = 0.6931471805599453f;
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

// Element offset of (row, col) in a swizzled [rows][D] tile.
template <int D> __device__ __forceinline__ int swz(int row, int col) {
    return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// Async copy of `rows` rows x D columns into a swizzled tile. Row r reads
// src + r * stride; rows >= valid are zero-filled (and read nothing).
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(T* tile, const T* src, long long stride, int valid, int tid) {
    constexpr int CPR = D / 8;  // 16-byte chunks per row
#pragma unroll
    for (int i = tid; i < ROWS * CPR; i += THREADS) {
        const int r = i / CPR, c = (i % CPR) * 8;
        const bool ok = r < valid;
        const T* g = ok ? src + (long long)r * stride + c : src;
        cp_async16(tile + swz<D>(r, c), g, ok ? 16 : 0);
    }
}

// Per-row RMS statistics over a swizzled [ROWS][D] tile, GROUP = THREADS / ROWS
// consecutive threads per row. Returns sum of squares of the caller's row (all
// threads of the group get it) and the row index.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ float row_sumsq(const T* tile, int tid, int* row_out) {
    constexpr int GROUP = THREADS / ROWS;
    static_assert(GROUP >= 1 && GROUP <= 32 && (GROUP & (GROUP - 1)) == 0, "row group");
    const int row = tid / GROUP, part = tid % GROUP;
    constexpr int COLS = D / GROUP;  // a multiple of 8
    float ss = 0.f;
#pragma unroll
    for (int c = part * COLS; c < (part + 1) * COLS; c += 8) {
        vec8 v = *reinterpret_cast<const vec8*>(tile + swz<D>(row, c));
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

// q' = q * (wq / rms(q) if wq) * (wk if wk), rounded to T, in place. With
// k-norm on, q' . k * (1 / rms(k)) = rmsnorm(q) . rmsnorm(k): the k weight is
// folded into q and only a per-key scale remains (row_inv_rms on K tiles).
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void fold_q_norm(T* tile, const T* wq, const T* wk, float eps, int tid) {
    constexpr int GROUP = THREADS / ROWS;
    int row;
    const float ss = row_sumsq<T, D, ROWS, THREADS>(tile, tid, &row);
    const float inv = wq ? rsqrtf(ss / (float)D + eps) : 1.f;
    const int part = tid % GROUP;
    constexpr int COLS = D / GROUP;
#pragma unroll
    for (int c = part * COLS; c < (part + 1) * COLS; c += 8) {
        vec8* p = reinterpret_cast<vec8*>(tile + swz<D>(row, c));
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

// S[16 x 8*NT] += Q[16 x D] K[8*NT x D]^T for one warp. `qa` are the Q rows'
// A fragments (from registers when Q_REGS, else ldmatrix from qtile rows
// q_row0..+16); K rows k_row0 .. k_row0 + 8*NT of ktile.
template <typename T, int D, int NT, bool Q_REGS>
__device__ __forceinline__ void qk_tile(float (*s)[4], const u32 (*qa)[4], const T* qtile, int q_row0, const T* ktile, int k_row0, int lane) {
    static_assert(NT % 2 == 0, "n tiles in pairs");
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        u32 a[4];
        if (Q_REGS) {
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = qa[ks][i];
        } else {
            ldmatrix_x4(a, qtile + swz<D>(q_row0 + (lane & 15), ks * 16 + (lane >> 4) * 8));
        }
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            u32 b[4];
            ldmatrix_x4(b, ktile + swz<D>(k_row0 + np * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 16 + ((lane >> 3) & 1) * 8));
            mma_16816<T>(s[2 * np], a, b);
            mma_16816<T>(s[2 * np + 1], a, b + 2);
        }
    }
}

// A fragments of a warp's 16 Q rows (row0 .. row0 + 16) for every k step.
template <typename T, int D>
__device__ __forceinline__ void load_q_frags(u32 (*qa)[4], const T* qtile, int row0, int lane) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) ldmatrix_x4(qa[ks], qtile + swz<D>(row0 + (lane & 15), ks * 16 + (lane >> 4) * 8));
}

// Online softmax over one S tile (already in log2 units, masked to -inf):
// updates the running max m and the thread-partial row sums l of the two rows
// the thread holds (fragment rows lane/4 and lane/4 + 8), rescales o, and
// turns s into probabilities. -inf rows (nothing visible yet) stay harmless.
template <int NT, int OT>
__device__ __forceinline__ void online_softmax(float (*s)[4], float (*o)[4], float* m, float* l) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = neg_inf();
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[r], mx);
        const float m_use = m_new == neg_inf() ? 0.f : m_new;
        const float alpha = fast_exp2(m[r] - m_use);
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            s[nt][2 * r] = fast_exp2(s[nt][2 * r] - m_use);
            s[nt][2 * r + 1] = fast_exp2(s[nt][2 * r + 1] - m_use);
            sum += s[nt][2 * r] + s[nt][2 * r + 1];
        }
        l[r] = l[r] * alpha + sum;
        m[r] = m_new;
#pragma unroll
        for (int ot = 0; ot < OT; ++ot) {
            o[ot][2 * r] *= alpha;
            o[ot][2 * r + 1] *= alpha;
        }
    }
}

// O[16 x DV] += P[16 x 16*KT] V[16*KT x DV]: P from the S accumulators (the C
// layout of n tiles 2kk, 2kk+1 is the A layout of k step kk), V rows
// v_row0 .. + 16*KT of vtile (ldmatrix.trans gives the col-major B operand).
template <typename T, int DV, int KT>
__device__ __forceinline__ void pv_tile(float (*o)[4], float (*s)[4], const T* vtile, int v_row0, int lane) {
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
        u32 a[4];
        a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < DV / 16; ++dp) {
            u32 b[4];
            ldmatrix_x4_trans(b, vtile + swz<DV>(v_row0 + kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dp * 16 + (lane >> 4) * 8));
            mma_16816<T>(o[2 * dp], a, b);
            mma_16816<T>(o[2 * dp + 1], a, b + 2);
        }
    }
}

} // namespace sparse
} // namespace natsl
