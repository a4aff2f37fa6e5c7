// gdn/prep.cuh: the fully parallel half of the GDN chunk scan (see gdn/prefill.cuh):
// per (chunk slot, value head), T = (I + A)^{-1}, W, U, P and the row factors F.
#pragma once
#include "common/dtype.cuh"
#include "common/mma_sm80.cuh"
#include "common/varlen.cuh"
#include "gdn/common.cuh"

namespace natsl {
namespace gdn {

constexpr int PREP_THREADS = 128;

// ---------------------------------------------------------------- blocked inverse

// Blocked inversion helpers (prep_grouped, the fused prep): f32 smem operands split into bf16
// hi + lo halves, three mma per product (lo*lo dropped): ~16 mantissa bits.
__device__ __forceinline__ void split2(float a, float b, u32& hi, u32& lo) {
    hi = pack2<bf16>(a, b);
    lo = pack2<bf16>(a - lo_f32<bf16>(hi), b - hi_f32<bf16>(hi));
}
// A fragment (16x16) of a row-major f32 tile at rows r0.., cols c0...
__device__ __forceinline__ void frag_a_f32(u32* hi, u32* lo, const float* base, int ld, int r0, int c0) {
    const int l = threadIdx.x % 32, g = l / 4, t = l % 4;
    const float* p0 = base + (r0 + g) * ld + c0 + 2 * t;
    const float* p1 = p0 + 8 * ld;
    const float2 x0 = *reinterpret_cast<const float2*>(p0), x1 = *reinterpret_cast<const float2*>(p1);
    const float2 x2 = *reinterpret_cast<const float2*>(p0 + 8), x3 = *reinterpret_cast<const float2*>(p1 + 8);
    split2(x0.x, x0.y, hi[0], lo[0]);
    split2(x1.x, x1.y, hi[1], lo[1]);
    split2(x2.x, x2.y, hi[2], lo[2]);
    split2(x3.x, x3.y, hi[3], lo[3]);
}
// B fragment (k16 x n8) of a row-major [k][n] f32 tile at rows k0.., cols n0...
__device__ __forceinline__ void frag_b_f32(u32* hi, u32* lo, const float* base, int ld, int k0, int n0) {
    const int l = threadIdx.x % 32, g = l / 4, t = l % 4;
    const float* p = base + (k0 + 2 * t) * ld + n0 + g;
    split2(p[0], p[ld], hi[0], lo[0]);
    split2(p[8 * ld], p[9 * ld], hi[1], lo[1]);
}
// A fragment of k-block kb from an f32 accumulator strip x[n8 tile][4].
__device__ __forceinline__ void frag_a_acc(u32* hi, u32* lo, const float (*x)[4], int kb) {
    split2(x[2 * kb][0], x[2 * kb][1], hi[0], lo[0]);
    split2(x[2 * kb][2], x[2 * kb][3], hi[1], lo[1]);
    split2(x[2 * kb + 1][0], x[2 * kb + 1][1], hi[2], lo[2]);
    split2(x[2 * kb + 1][2], x[2 * kb + 1][3], hi[3], lo[3]);
}
__device__ __forceinline__ void mma3(float* d, const u32* ah, const u32* al, const u32* bh, const u32* bl) {
    mma_16816<bf16>(d, al, bh);
    mma_16816<bf16>(d, ah, bl);
    mma_16816<bf16>(d, ah, bh);
}
// Y (16 x 8*NY) = -(L X) R for one 16-row strip, all f32 in smem (ld LD):
//   X (16 x 8*NX) = sum_{kb < KL} L[lr0.., lc0 + 16 kb..] M[mr0 + 16 kb.., mc0..]
//   Y            -= sum_{kb2 in [kr_lo, NX/2)} X[:, 16 kb2..] R[rr0 + 16 kb2.., rc0..]
template <int NX, int NY, int LD>
__device__ __forceinline__ void strip_lmr(float (*y)[4], const float* s, int KL, int lr0, int lc0, int mr0, int mc0,
                                          int kr_lo, int rr0, int rc0) {
    float x[NX][4];
#pragma unroll
    for (int i = 0; i < NX; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) x[i][e] = 0.f;
#pragma unroll
    for (int kb = 0; kb < 2; ++kb) {
        if (kb < KL) {
            u32 ah[4], al[4];
            frag_a_f32(ah, al, s, LD, lr0, lc0 + 16 * kb);
#pragma unroll
            for (int nt = 0; nt < NX; ++nt) {
                u32 bh[2], bl[2];
                frag_b_f32(bh, bl, s, LD, mr0 + 16 * kb, mc0 + 8 * nt);
                mma3(x[nt], ah, al, bh, bl);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < NY; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) y[i][e] = 0.f;
#pragma unroll
    for (int kb = 0; kb < NX / 2; ++kb) {
        if (kb >= kr_lo) {
            u32 ah[4], al[4];
            frag_a_acc(ah, al, x, kb);
#pragma unroll
            for (int nt = 0; nt < NY; ++nt) {
                u32 bh[2], bl[2];
                frag_b_f32(bh, bl, s, LD, rr0 + 16 * kb, rc0 + 8 * nt);
                mma3(y[nt], ah, al, bh, bl);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < NY; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) y[i][e] = -y[i][e];
}

// Region R0 of the prep's smem (see prep_grouped): max(Q, the f32 A / T tile).
template <int DK>
constexpr int prep_r0() {
    return (C * (DK + PAD) * 2 > C * (C + 4) * 4) ? C * (DK + PAD) * 2 : C * (C + 4) * 4;
}

// ---------------------------------------------------------------- prep_grouped
//
// GROUPED prep: one CTA per (chunk slot, q/k head) that serves the G = Hv / Hqk value
// heads of that q/k head (GVA) one after the other. Per value head the blocked
// split-bf16 inverse, T kept as bf16 mma A fragments in registers scaled by
// diag(beta e^G / |k|) (for W) and diag(beta) (for U), blocks above the diagonal
// skipped, W, U and P stored from the accumulators; what is done once per q/k head:
//   - q and k are loaded once and never rescaled in smem: the L2 norms come from
//     the diagonals of Q Q^T and K K^T (two extra mma per k-step on the A fragments
//     already in registers) and are folded into the f32 factors of P, A and the
//     W fragments (W = T diag(beta e^G / |k|) K_raw);
//   - Q K^T is computed once; P of every value head is written from those
//     accumulators (per head only the decay e^{G_i - G_j} differs).
// Per value head: K K^T (K stays in smem for W), A, T, W, U. Two smem regions:
//   R0: Q -> (per head) A / T (f32) -> V column chunks;  R1: K (all heads).
// (A compact prep of one CTA per (chunk slot, value head) was removed: slower at every
// measured shape, bench/NOTES.md.)
// Gates: per head, warp 0 writes G (log2 units), beta and beta e^G to smem one
// head ahead (loads issued a head earlier), so no barrier waits on global loads.
template <int DK, int DV>
constexpr int prep_grouped_smem_bytes() {
    return prep_r0<DK>() + C * (DK + PAD) * 2 + 5 * C * 4;
}
template <int DK, int DV>
constexpr int prep_grouped_min_ctas() {
    return (233472 / (prep_grouped_smem_bytes<DK, DV>() + 1024)) < 4 ? (233472 / (prep_grouped_smem_bytes<DK, DV>() + 1024)) : 4;
}

constexpr float PREP_LOG2E = 1.4426950408889634f;

// Lane l: raw g (and beta) of tokens 2l, 2l+1 of value head h (0 past len).
template <typename T>
__device__ __forceinline__ void prep_load_gates(const NatslGdnPrefillParams& p, int t0, int len, int h, float* g2, float* b2) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int j = 2 * lane + e;
        const bool ok = j < len;
        g2[e] = ok ? p.g[(i64)(t0 + j) * p.g_stride_t + h] : 0.f;
        if (b2) b2[e] = ok ? load_beta<T>(p.beta, p.beta_f32, (i64)(t0 + j) * p.beta_stride_t + h) : 0.f;
    }
}
// Inclusive cumsum over the chunk of (a, b) = (g_{2l}, g_{2l+1}) held by lane l.
__device__ __forceinline__ void prep_warp_cumsum(float& a, float& b) {
    const int lane = threadIdx.x % 32;
    float s = a + b;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float y = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += y;
    }
    const float excl = s - (a + b);
    const float ga = excl + a, gb = excl + a + b;
    a = ga;
    b = gb;
}

// load_rows_async with the thread index read afresh (asm volatile): called inside
// the value-head loop, its per-thread row offsets are not hoisted out of the loop
// (they would stay live across it and spill).
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_rows_async_fresh(T* smem, int ld, const T* src, i64 stride, int valid) {
    constexpr int VPR = COLS / 8;
    int tid;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
#pragma unroll 4
    for (int i = tid; i < ROWS * VPR; i += THREADS) {
        const int r = i / VPR, c = (i % VPR) * 8;
        const bool ok = r < valid;
        const T* g = ok ? src + (i64)r * stride + c : src;
        cp_async16(smem + r * ld + c, g, ok ? 16 : 0);
    }
}

// Lane-parameterised copies of the fragment helpers (frag_a, frag_b2_nk, frag_b2_kn,
// frag_a_f32, frag_b_f32, strip_lmr) and a T X product stored to global rows
// (gprep_tx_store) for the value-head loop: with
// the lane read afresh each iteration (prep_fresh_tid) their per-thread smem offsets
// are recomputed in the loop instead of hoisted out of it and kept live (spills).
__device__ __forceinline__ int prep_fresh_tid() {
    int t;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
    return t;
}
__device__ __forceinline__ void gfrag_a(u32* a, const void* base, int ld_bytes, int m0, int k0_bytes, int l) {
    const char* p = (const char*)base + (m0 + (l % 16)) * ld_bytes + k0_bytes + (l / 16) * 16;
    ldmatrix_x4(a, p);
}
__device__ __forceinline__ void gfrag_b2_kn(u32* b, const void* base, int ld_bytes, int k0, int n0_bytes, int l) {
    const char* p = (const char*)base + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * ld_bytes + n0_bytes + (l >> 4) * 16;
    ldmatrix_x4_trans(b, p);
}
__device__ __forceinline__ void gfrag_b2_nk(u32* b, const void* base, int ld_bytes, int n0, int k0_bytes, int l) {
    const char* p = (const char*)base + (n0 + (l & 7) + (l >> 4) * 8) * ld_bytes + k0_bytes + ((l >> 3) & 1) * 16;
    ldmatrix_x4(b, p);
}
__device__ __forceinline__ void gfrag_a_f32(u32* hi, u32* lo, const float* base, int ld, int r0, int c0, int l) {
    const int g = l / 4, t = l % 4;
    const float* p0 = base + (r0 + g) * ld + c0 + 2 * t;
    const float* p1 = p0 + 8 * ld;
    const float2 x0 = *reinterpret_cast<const float2*>(p0), x1 = *reinterpret_cast<const float2*>(p1);
    const float2 x2 = *reinterpret_cast<const float2*>(p0 + 8), x3 = *reinterpret_cast<const float2*>(p1 + 8);
    split2(x0.x, x0.y, hi[0], lo[0]);
    split2(x1.x, x1.y, hi[1], lo[1]);
    split2(x2.x, x2.y, hi[2], lo[2]);
    split2(x3.x, x3.y, hi[3], lo[3]);
}
__device__ __forceinline__ void gfrag_b_f32(u32* hi, u32* lo, const float* base, int ld, int k0, int n0, int l) {
    const int g = l / 4, t = l % 4;
    const float* p = base + (k0 + 2 * t) * ld + n0 + g;
    split2(p[0], p[ld], hi[0], lo[0]);
    split2(p[8 * ld], p[9 * ld], hi[1], lo[1]);
}
template <int NX, int NY, int LD>
__device__ __forceinline__ void gstrip_lmr(float (*y)[4], const float* s, int KL, int lr0, int lc0, int mr0, int mc0,
                                           int kr_lo, int rr0, int rc0, int l) {
    float x[NX][4];
#pragma unroll
    for (int i = 0; i < NX; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) x[i][e] = 0.f;
#pragma unroll
    for (int kb = 0; kb < 2; ++kb) {
        if (kb < KL) {
            u32 ah[4], al[4];
            gfrag_a_f32(ah, al, s, LD, lr0, lc0 + 16 * kb, l);
#pragma unroll
            for (int nt = 0; nt < NX; ++nt) {
                u32 bh[2], bl[2];
                gfrag_b_f32(bh, bl, s, LD, mr0 + 16 * kb, mc0 + 8 * nt, l);
                mma3(x[nt], ah, al, bh, bl);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < NY; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) y[i][e] = 0.f;
#pragma unroll
    for (int kb = 0; kb < NX / 2; ++kb) {
        if (kb >= kr_lo) {
            u32 ah[4], al[4];
            frag_a_acc(ah, al, x, kb);
#pragma unroll
            for (int nt = 0; nt < NY; ++nt) {
                u32 bh[2], bl[2];
                gfrag_b_f32(bh, bl, s, LD, rr0 + 16 * kb, rc0 + 8 * nt, l);
                mma3(y[nt], ah, al, bh, bl);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < NY; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) y[i][e] = -y[i][e];
}
template <typename T, int NCOLS>
__device__ __forceinline__ void gprep_tx_store(const u32 (*tf)[4], int kbmax, const T* sX, int ldx, int c0, T* dst, int ld,
                                               int m0, int lane) {
#pragma unroll 1
    for (int nb = 0; nb < NCOLS; nb += 32) {
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
#pragma unroll
        for (int kb = 0; kb < 4; ++kb) {
            if (kb <= kbmax) {
#pragma unroll
                for (int nt = 0; nt < 4; nt += 2) {
                    u32 b[4];
                    gfrag_b2_kn(b, sX, ldx * 2, kb * 16, (c0 + nb + nt * 8) * 2, lane);
                    mma_16816<T>(acc[nt], tf[kb], b);
                    mma_16816<T>(acc[nt + 1], tf[kb], b + 2);
                }
            }
        }
        const int r = m0 + lane / 4;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int cc = c0 + nb + nt * 8 + (lane % 4) * 2;
            *reinterpret_cast<u32*>(dst + (i64)r * ld + cc) = pack2<T>(acc[nt][0], acc[nt][1]);
            *reinterpret_cast<u32*>(dst + (i64)(r + 8) * ld + cc) = pack2<T>(acc[nt][2], acc[nt][3]);
        }
    }
}

// The split fused prefill's record per (slot, value head) in p.ws_fused (FUSED_WS): Tb =
// T diag(beta) and P as [64][64] panels in the sw128 layout (row r's 16-byte chunk j at
// j ^ (r & 7)), so one bulk copy into a 1024-aligned stage is what wgmma reads; then F
// (f32): fq[64] | fk[64] | G_L, label | fe[64] (gdn/fused.cuh reads it in place).
constexpr int FREC_TB = 0, FREC_P = 64 * 128, FREC_F = 2 * 64 * 128, FREC_BYTES = NATSL_GDN_FREC_BYTES;
static_assert(FREC_F + 4 * 64 * 4 == FREC_BYTES, "fused record: Tb | P | F");
// Element offset of (row, col) in one sw128 [64][64] panel.
__device__ __forceinline__ int prep_sw64(int row, int col) {
    return row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

// FUSED_WS (entry fused_prep): the same per-chunk math, but per value head only P, Tb and
// F go out, as the split fused kernel's records (no W, U: its consumers form U and W S
// from Tb); the inline prep of gdn/fused.cuh computes the same quantities on chip.
template <typename T, int DK, int DV, bool FUSED_WS = false>
__device__ void prep_grouped(const NatslGdnPrefillParams& p) {
    constexpr int NT = PREP_THREADS, NW = NT / 32;
    constexpr int LDK = DK + PAD, LDA = C + 4;
    constexpr int R0 = prep_r0<DK>();
    constexpr int VC = DK < DV ? DK : DV;  // V columns per chunk (through R0)
    constexpr int NCH = DV / VC;
    constexpr int LDVC = VC + PAD;
    static_assert(DK % 64 == 0 && DV % 64 == 0, "head dims must be multiples of 64");
    static_assert(DV % VC == 0, "V chunks must tile dv");
    static_assert(C * LDVC * 2 <= R0 && C * LDA * 4 <= R0, "R0 too small");
    static_assert(NT == 2 * C && NW == 4, "prep: 4 warps of 16 rows");
    extern __shared__ __align__(16) unsigned char smem[];
    T* sQ = reinterpret_cast<T*>(smem);
    float* sA = reinterpret_cast<float*>(smem);
    T* sV = reinterpret_cast<T*>(smem);
    T* sK = reinterpret_cast<T*>(smem + R0);
    float* sInvQ = reinterpret_cast<float*>(smem + R0 + C * LDK * 2);
    float* sInvK = sInvQ + C;
    float* sG2 = sInvK + C;  // current head: cumulative gate, log2 units
    float* sB = sG2 + C;     // beta
    float* sE = sB + C;      // beta e^G

    // Grid (num_slots, Hqk) walked with the q/k head fastest.
    const int Hv = p.num_v_heads, Hqk = p.num_qk_heads, G = Hv / Hqk;
    const int lin = blockIdx.y * gridDim.x + blockIdx.x;
    const int slot = lin / Hqk, hq = lin % Hqk;
    int c;
    const int n = seq_of_slot(p.batch, slot, &c);
    if (n < 0) return;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int t0 = p.batch.cu_seqlens[n] + c * C;
    const int len = min(C, p.batch.cu_seqlens[n + 1] - t0);
    const int h0 = hq * G;
    const int m0 = warp * 16, g = lane / 4, tq = lane % 4;

    load_rows_async<T, C, DK, NT>(sQ, LDK, reinterpret_cast<const T*>(p.q) + (i64)t0 * p.q_stride_t + (i64)hq * p.q_stride_h, p.q_stride_t, len);
    load_rows_async<T, C, DK, NT>(sK, LDK, reinterpret_cast<const T*>(p.k) + (i64)t0 * p.k_stride_t + (i64)hq * p.k_stride_h, p.k_stride_t, len);
    cp_async_commit();
    // Warp 0: gates of head 0 to smem (G in log2 units, beta, beta e^G).
    auto put_gates = [&](const float* gr, const float* br) {
        float a = gr[0], b = gr[1];
        prep_warp_cumsum(a, b);
        *reinterpret_cast<float2*>(sG2 + 2 * lane) = make_float2(a * PREP_LOG2E, b * PREP_LOG2E);
        *reinterpret_cast<float2*>(sB + 2 * lane) = make_float2(br[0], br[1]);
        *reinterpret_cast<float2*>(sE + 2 * lane) = make_float2(br[0] * __expf(a), br[1] * __expf(b));
    };
    float gn[2], bn[2];  // warp 0: raw gates of the next head
    if (warp == 0) {
        prep_load_gates<T>(p, t0, len, h0, gn, bn);
        put_gates(gn, bn);
        if (G > 1) prep_load_gates<T>(p, t0, len, h0 + 1, gn, bn);
    }
    cp_async_wait<0>();
    __syncthreads();

    // Q K^T (lower tiles) and the diagonal blocks of Q Q^T and K K^T (row norms).
    float qk[8][4];
    {
        float qd[2][4], kd[2][4];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) qk[i][e] = 0.f;
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) qd[i][e] = kd[i][e] = 0.f;
#pragma unroll 2
        for (int k0 = 0; k0 < DK; k0 += 16) {
            u32 aq[4], ak[4];
            frag_a(aq, sQ, LDK * 2, m0, k0 * 2);
            frag_a(ak, sK, LDK * 2, m0, k0 * 2);
#pragma unroll
            for (int nt = 0; nt < 8; nt += 2) {
                if (nt / 2 <= warp) {
                    u32 b[4];
                    frag_b2_nk(b, sK, LDK * 2, nt * 8, k0 * 2);
                    mma_16816<T>(qk[nt], aq, b);
                    mma_16816<T>(qk[nt + 1], aq, b + 2);
                }
            }
            // B fragments of the diagonal block are the A fragment's own registers.
            const u32 bq0[2] = {aq[0], aq[2]}, bq1[2] = {aq[1], aq[3]};
            const u32 bk0[2] = {ak[0], ak[2]}, bk1[2] = {ak[1], ak[3]};
            mma_16816<T>(qd[0], aq, bq0);
            mma_16816<T>(qd[1], aq, bq1);
            mma_16816<T>(kd[0], ak, bk0);
            mma_16816<T>(kd[1], ak, bk1);
        }
        if (tq == (g >> 1)) {  // this lane holds the diagonal of rows m0 + g, m0 + g + 8
            const bool odd = g & 1;
            const float q0 = odd ? qd[0][1] : qd[0][0], q1 = odd ? qd[1][3] : qd[1][2];
            const float k0 = odd ? kd[0][1] : kd[0][0], k1 = odd ? kd[1][3] : kd[1][2];
            const bool l2 = p.l2norm;
            sInvQ[m0 + g] = l2 ? rsqrtf(q0 + 1e-6f) : 1.f;
            sInvQ[m0 + g + 8] = l2 ? rsqrtf(q1 + 1e-6f) : 1.f;
            sInvK[m0 + g] = l2 ? rsqrtf(k0 + 1e-6f) : 1.f;
            sInvK[m0 + g + 8] = l2 ? rsqrtf(k1 + 1e-6f) : 1.f;
        }
    }
    __syncthreads();  // norms visible; every warp is done with Q (R0 is free)

    // qk <- scale qk / (|q_i| |k_j|) (lower tiles).
    {
        const float r0 = p.scale * sInvQ[m0 + g], r1 = p.scale * sInvQ[m0 + g + 8];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            if (nt / 2 <= warp) {
                const float2 ck = *reinterpret_cast<const float2*>(sInvK + nt * 8 + 2 * tq);
                qk[nt][0] *= r0 * ck.x;
                qk[nt][1] *= r0 * ck.y;
                qk[nt][2] *= r1 * ck.x;
                qk[nt][3] *= r1 * ck.y;
            }
        }
    }
    // P (and F) of every value head of the group from the same Q K^T. Each warp scans
    // the gates itself (lane l: tokens 2l, 2l+1); no smem, no barrier.
    {
        float gc[2];
        prep_load_gates<T>(p, t0, len, h0, gc, nullptr);
#pragma unroll 1
        for (int hh = 0; hh < G; ++hh) {
            float gx[2] = {gc[0], gc[1]};
            if (hh + 1 < G) prep_load_gates<T>(p, t0, len, h0 + hh + 1, gc, nullptr);
            prep_warp_cumsum(gx[0], gx[1]);
            const i64 wrow = (i64)slot * Hv + h0 + hh;
            if (warp == hh % NW) {  // row factors of the scan: F = [fq | fk | G]
                const float gl = __shfl_sync(0xffffffffu, gx[1], 31);
                if constexpr (FUSED_WS) {
                    // F of the fused record: fq | fk | G_L, label | fe (label: complete chunks only).
                    float* f = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(p.ws_fused) + wrow * FREC_BYTES + FREC_F);
                    const float2 iq = *reinterpret_cast<const float2*>(sInvQ + 2 * lane);
                    const float2 ik = *reinterpret_cast<const float2*>(sInvK + 2 * lane);
                    *reinterpret_cast<float2*>(f + 2 * lane) = make_float2(p.scale * __expf(gx[0]) * iq.x, p.scale * __expf(gx[1]) * iq.y);
                    *reinterpret_cast<float2*>(f + C + 2 * lane) = make_float2(__expf(gl - gx[0]) * ik.x, __expf(gl - gx[1]) * ik.y);
                    *reinterpret_cast<float2*>(f + 3 * C + 2 * lane) = make_float2(__expf(gx[0]) * ik.x, __expf(gx[1]) * ik.y);
                    if (lane == 0) {
                        int label = NATSL_LABEL_GDN;
                        if (len == C && p.labels) label = read_label(p.labels, (i64)slot * p.num_r_heads + (h0 + hh) / (Hv / p.num_r_heads), p.faults);
                        f[2 * C] = gl;
                        f[2 * C + 1] = __int_as_float(label);
                    }
                } else {
                    float* f = p.ws_g + wrow * (3 * C);
                    const float2 iq = *reinterpret_cast<const float2*>(sInvQ + 2 * lane);
                    const float2 ik = *reinterpret_cast<const float2*>(sInvK + 2 * lane);
                    *reinterpret_cast<float2*>(f + 2 * lane) = make_float2(p.scale * __expf(gx[0]) * iq.x, p.scale * __expf(gx[1]) * iq.y);
                    *reinterpret_cast<float2*>(f + C + 2 * lane) = make_float2(__expf(gl - gx[0]) * ik.x, __expf(gl - gx[1]) * ik.y);
                    *reinterpret_cast<float2*>(f + 2 * C + 2 * lane) = make_float2(gx[0], gx[1]);
                }
            }
            const float la = gx[0] * PREP_LOG2E, lb = gx[1] * PREP_LOG2E;
            float gi[2];
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int src = (m0 + g + 8 * hf) >> 1;
                const float xa = __shfl_sync(0xffffffffu, la, src), xb = __shfl_sync(0xffffffffu, lb, src);
                gi[hf] = (g & 1) ? xb : xa;
            }
            T* wsP = FUSED_WS ? reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(p.ws_fused) + wrow * FREC_BYTES + FREC_P)
                              : reinterpret_cast<T*>(p.ws_p) + wrow * C * C;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                u32 w[2] = {0u, 0u};  // upper tiles: P is zero there
                if (nt / 2 <= warp) {
                    const float ja = __shfl_sync(0xffffffffu, la, nt * 4 + tq), jb = __shfl_sync(0xffffffffu, lb, nt * 4 + tq);
                    const int j = nt * 8 + tq * 2;
#pragma unroll
                    for (int hf = 0; hf < 2; ++hf) {
                        const int i = m0 + g + hf * 8;
                        const float d0 = j <= i ? fast_exp2(gi[hf] - ja) : 0.f;
                        const float d1 = j + 1 <= i ? fast_exp2(gi[hf] - jb) : 0.f;
                        w[hf] = pack2<T>(qk[nt][hf * 2] * d0, qk[nt][hf * 2 + 1] * d1);
                    }
                }
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    if constexpr (FUSED_WS) *reinterpret_cast<u32*>(wsP + prep_sw64(m0 + g + hf * 8, nt * 8 + tq * 2)) = w[hf];
                    else *reinterpret_cast<u32*>(wsP + (m0 + g + hf * 8) * C + nt * 8 + tq * 2) = w[hf];
                }
            }
        }
    }

    // Per value head: A, T, W, U.
#pragma unroll 1
    for (int hh = 0; hh < G; ++hh) {
        const int h = h0 + hh;
        const i64 wrow = (i64)slot * Hv + h;
        // Thread indices read afresh (see prep_fresh_tid), shadowing the outer ones.
        const int tid = prep_fresh_tid(), warp = tid / 32, lane = tid % 32;
        const int m0 = warp * 16, g = lane / 4, tq = lane % 4;
        // K K^T (lower tiles) of raw K: K stays in R1 for every head.
        float kk[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) kk[i][e] = 0.f;
#pragma unroll 2
        for (int k0 = 0; k0 < DK; k0 += 16) {
            u32 ak[4];
            gfrag_a(ak, sK, LDK * 2, m0, k0 * 2, lane);
#pragma unroll
            for (int nt = 0; nt < 8; nt += 2) {
                if (nt / 2 <= warp) {
                    u32 b[4];
                    gfrag_b2_nk(b, sK, LDK * 2, nt * 8, k0 * 2, lane);
                    mma_16816<T>(kk[nt], ak, b);
                    mma_16816<T>(kk[nt + 1], ak, b + 2);
                }
            }
        }
        __syncthreads();  // R0 free (previous head's U has read V); this head's gates visible
        // A = strictly_lower(beta_i e^{G_i - G_j} k_i.k_j / (|k_i| |k_j|)) into R0.
        {
            const float gi0 = sG2[m0 + g], gi1 = sG2[m0 + g + 8];
            const float ri0 = sB[m0 + g] * sInvK[m0 + g], ri1 = sB[m0 + g + 8] * sInvK[m0 + g + 8];
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                if (nt / 2 > warp) continue;  // A is never read above the diagonal blocks
                const int j = nt * 8 + tq * 2;
                const float2 gj = *reinterpret_cast<const float2*>(sG2 + j);
                const float2 ck = *reinterpret_cast<const float2*>(sInvK + j);
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const int i = m0 + g + hf * 8;
                    const float gi = hf ? gi1 : gi0, ri = hf ? ri1 : ri0;
                    const float a0 = j < i ? ri * fast_exp2(gi - gj.x) * (ck.x * kk[nt][hf * 2]) : 0.f;
                    const float a1 = j + 1 < i ? ri * fast_exp2(gi - gj.y) * (ck.y * kk[nt][hf * 2 + 1]) : 0.f;
                    *reinterpret_cast<float2*>(sA + i * LDA + j) = make_float2(a0, a1);
                }
            }
        }
        __syncthreads();

        // Level 0: thread tid < 64 solves column m of the inverse of diagonal block tid / 16.
        {
            const int m = tid % 16, o = (tid / 16) * 16;
            float t[16];
            if (tid < C) {
#pragma unroll
                for (int i = 0; i < 16; ++i) {
                    float s0 = 0.f, s1 = 0.f;
#pragma unroll
                    for (int j = 0; j < i; j += 4) {
                        const float4 a = *reinterpret_cast<const float4*>(sA + (o + i) * LDA + o + j);
                        s0 = fmaf(a.x, t[j], s0);
                        if (j + 1 < i) s1 = fmaf(a.y, t[j + 1], s1);
                        if (j + 2 < i) s0 = fmaf(a.z, t[j + 2], s0);
                        if (j + 3 < i) s1 = fmaf(a.w, t[j + 3], s1);
                    }
                    t[i] = i == m ? 1.f : -(s0 + s1);
                }
            }
            __syncthreads();  // the diagonal blocks of A are read
            if (tid < C) {
#pragma unroll
                for (int i = 0; i < 16; ++i) sA[(o + i) * LDA + o + m] = t[i];
            }
        }
        __syncthreads();  // diagonal inverses D0..D3 in sA
        if (warp < 2) {
            // Level 1: T[o+16.., o..] = -(D_hi A[o+16.., o..]) D_lo, o = 32 warp.
            const int o = warp * 32;
            float y[2][4];
            gstrip_lmr<2, 2, LDA>(y, sA, 1, o + 16, o + 16, o + 16, o, 0, o, o, lane);
            __syncwarp();  // all lanes have read A[o+16.., o..]
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const int r = o + 16 + g + hf * 8, cc = o + nt * 8 + tq * 2;
                    *reinterpret_cast<float2*>(sA + r * LDA + cc) = make_float2(y[nt][hf * 2], y[nt][hf * 2 + 1]);
                }
        }
        __syncthreads();  // T[0:32, 0:32] and T[32:64, 32:64] complete in sA
        {
            // Level 2: T[32:64, 0:32] = -(T[32:64, 32:64] A[32:64, 0:32]) T[0:32, 0:32].
            const int s = warp & 1, hc = warp >> 1;
            float y[2][4];
            gstrip_lmr<4, 2, LDA>(y, sA, s + 1, 32 + 16 * s, 32, 32, 0, hc, 0, 16 * hc, lane);
            __syncthreads();
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const int r = 32 + 16 * s + g + hf * 8, cc = 16 * hc + nt * 8 + tq * 2;
                    *reinterpret_cast<float2*>(sA + r * LDA + cc) = make_float2(y[nt][hf * 2], y[nt][hf * 2 + 1]);
                }
        }
        __syncthreads();  // T complete (f32, lower block triangle) in sA

        if constexpr (FUSED_WS) {
            // This warp's 16 rows of Tb = T diag(beta) (zero above the diagonal blocks), as
            // the inline prep of gdn/fused.cuh forms them.
            T* tb = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(p.ws_fused) + wrow * FREC_BYTES + FREC_TB);
#pragma unroll
            for (int kb = 0; kb < 4; ++kb) {
                const int c0 = 16 * kb + 2 * tq;
                u32 x[4] = {0u, 0u, 0u, 0u};
                if (kb <= warp) {
                    const float* p0 = sA + (m0 + g) * LDA + c0;
                    const float* p1 = p0 + 8 * LDA;
                    const float2 x0 = *reinterpret_cast<const float2*>(p0), x1 = *reinterpret_cast<const float2*>(p1);
                    const float2 x2 = *reinterpret_cast<const float2*>(p0 + 8), x3 = *reinterpret_cast<const float2*>(p1 + 8);
                    const float2 bl = *reinterpret_cast<const float2*>(sB + c0), bh = *reinterpret_cast<const float2*>(sB + c0 + 8);
                    x[0] = pack2<T>(x0.x * bl.x, x0.y * bl.y);
                    x[1] = pack2<T>(x1.x * bl.x, x1.y * bl.y);
                    x[2] = pack2<T>(x2.x * bh.x, x2.y * bh.y);
                    x[3] = pack2<T>(x3.x * bh.x, x3.y * bh.y);
                }
                *reinterpret_cast<u32*>(tb + prep_sw64(m0 + g, c0)) = x[0];
                *reinterpret_cast<u32*>(tb + prep_sw64(m0 + g + 8, c0)) = x[1];
                *reinterpret_cast<u32*>(tb + prep_sw64(m0 + g, c0 + 8)) = x[2];
                *reinterpret_cast<u32*>(tb + prep_sw64(m0 + g + 8, c0 + 8)) = x[3];
            }
            __syncthreads();  // R0 and the gate arrays are free
            if (warp == 0 && hh + 1 < G) {  // next head's gates (published by the next loop-top barrier)
                put_gates(gn, bn);
                if (hh + 2 < G) prep_load_gates<T>(p, t0, len, h + 2, gn, bn);
            }
        } else {
            // This warp's 16 rows of T as bf16 A fragments:
            //   tw = T diag(beta e^G / |k|) (K is raw in smem), tu = T diag(beta).
            u32 tw[4][4], tu[4][4];
#pragma unroll
            for (int kb = 0; kb < 4; ++kb) {
                if (kb <= warp) {
                    const int c0 = 16 * kb + 2 * tq;
                    const float* p0 = sA + (m0 + g) * LDA + c0;
                    const float* p1 = p0 + 8 * LDA;
                    const float2 x0 = *reinterpret_cast<const float2*>(p0), x1 = *reinterpret_cast<const float2*>(p1);
                    const float2 x2 = *reinterpret_cast<const float2*>(p0 + 8), x3 = *reinterpret_cast<const float2*>(p1 + 8);
                    const float2 bl = *reinterpret_cast<const float2*>(sB + c0), bh = *reinterpret_cast<const float2*>(sB + c0 + 8);
                    const float2 el = *reinterpret_cast<const float2*>(sE + c0), eh = *reinterpret_cast<const float2*>(sE + c0 + 8);
                    const float2 kl = *reinterpret_cast<const float2*>(sInvK + c0), kh = *reinterpret_cast<const float2*>(sInvK + c0 + 8);
                    const float e0 = el.x * kl.x, e1 = el.y * kl.y, e8 = eh.x * kh.x, e9 = eh.y * kh.y;
                    tw[kb][0] = pack2<T>(x0.x * e0, x0.y * e1);
                    tw[kb][1] = pack2<T>(x1.x * e0, x1.y * e1);
                    tw[kb][2] = pack2<T>(x2.x * e8, x2.y * e9);
                    tw[kb][3] = pack2<T>(x3.x * e8, x3.y * e9);
                    tu[kb][0] = pack2<T>(x0.x * bl.x, x0.y * bl.y);
                    tu[kb][1] = pack2<T>(x1.x * bl.x, x1.y * bl.y);
                    tu[kb][2] = pack2<T>(x2.x * bh.x, x2.y * bh.y);
                    tu[kb][3] = pack2<T>(x3.x * bh.x, x3.y * bh.y);
                } else {
#pragma unroll
                    for (int e = 0; e < 4; ++e) tw[kb][e] = tu[kb][e] = 0u;
                }
            }
            __syncthreads();  // R0 and the gate arrays are free
            const T* gv = reinterpret_cast<const T*>(p.v) + (i64)t0 * p.v_stride_t + (i64)h * p.v_stride_h;
            load_rows_async_fresh<T, C, VC, NT>(sV, LDVC, gv, p.v_stride_t, len);
            cp_async_commit();
            if (warp == 0 && hh + 1 < G) {  // next head's gates (published by the next loop-top barrier)
                put_gates(gn, bn);
                if (hh + 2 < G) prep_load_gates<T>(p, t0, len, h + 2, gn, bn);
            }

            // W = T diag(beta e^G / |k|) K (K in R1).
            gprep_tx_store<T, DK>(tw, warp, sK, LDK, 0, reinterpret_cast<T*>(p.ws_w) + wrow * C * DK, DK, m0, lane);

            // U = T diag(beta) V, VC columns at a time through R0.
            T* wsU = reinterpret_cast<T*>(p.ws_u) + wrow * C * DV;
#pragma unroll
            for (int ch = 0; ch < NCH; ++ch) {
                if (ch > 0) {
                    __syncthreads();  // chunk ch - 1 is read
                    load_rows_async_fresh<T, C, VC, NT>(sV, LDVC, gv + ch * VC, p.v_stride_t, len);
                    cp_async_commit();
                }
                cp_async_wait<0>();
                __syncthreads();  // chunk ch visible
                gprep_tx_store<T, VC>(tu, warp, sV, LDVC, 0, wsU + ch * VC, DV, m0, lane);
            }
        }
    }
}

} // namespace gdn
} // namespace natsl
