// gdn/scan.cuh: the sequential half of the GDN chunk scan (see gdn/prefill.cuh):
// the state on chip across chunks, chunk commit, and context parallelism.
#pragma once
#include "common/dtype.cuh"
#include "common/mma_sm80.cuh"
#include "common/varlen.cuh"
#include "gdn/common.cuh"

namespace natsl {
namespace gdn {

// ---------------------------------------------------------------- scan

// Per-chunk cost of one CTA (dk = 128, BV = 64, 4 warps, mma.sync m16n8k16, ~2 GHz):
//   phase 1  W S and Q S, 2 x (64x128)(128x64): 128 mma per warp, 16 independent
//            accumulators per k-step -> ~1.0-1.3k cycles at one warp per SM sub-partition.
//   phase 2  P v_new (lower triangle, 8..32 mma per warp) + K^T (fk v_new) (64 mma per
//            warp, 16 accumulators) -> ~0.6-0.8k cycles.
//   loads    70 KB per chunk: Q, W, U, F (42 KB) are issued at barrier B1 and land during
//            phase 2; K, P (26 KB) are issued at B2 and land during phase 1 (S0 waits for
//            group A only, B1 for group B; until 2026-11-28 S0 waited for both, exposing
//            the whole K, P latency every chunk). Two CTAs per SM (108 KB smem each)
//            hide more under the other's math.
//   Measured (H200, ncu 2026-11-28, P1 8x8192 16/16, before the split wait): 662 us for
//   128 chunks = ~9.2k cycles per chunk and SM (2 CTAs), DRAM 48% (2.3 TB/s: the
//   unique W, U, P, Q, K, F, o traffic, ~1.45 GB), L2 64% (L2 -> SM ~3.6 TB/s: both
//   column tiles of a head read Q, K, W, P), 2 warps per scheduler. Memory-latency
//   bound, not math bound (~2-3k cycles of mma per chunk and SM).
//   => ~3k cycles (~1.5 us) per chunk and CTA pair, against ~24 us before: the previous
//   version re-normalised and gate-scaled every Q and K row inside the scan (a warp per
//   row, 32 rows per warp and matrix, shuffle reductions: ~30k cycles per chunk) and
//   exposed all 70 KB of loads (STAGES = 1, issued after the last barrier).
// Barriers per chunk: 3 (S0: Q, W, U, F landed; B1: v_new written / Q, W, U, F free /
// K, P landed; B2: K, P, state copy free).
// Context parallelism (MODE != 0, PrefillCp in src/ops/gdn.rs): the chunk map is affine
// in the start state, S' = M_c S + N_c with M_c = e^{G_L} I - Kd^T W (GDN chunk) or
// e^{G_L} I (ATTN chunk), Kd = diag(fk) K, and N_c = Kd^T U (0 for ATTN). Each sequence
// is split into segments of seg_len whole chunks (cp_geometry). Three launches:
//   MODE_CP_A (scan_cp_a): per (segment s < segs - 1, value head, column tile):
//     s = 0:  the ordinary scan from h0 over segment 0 (outputs o written); end state
//             -> E[0] (the true start state of segment 1).
//     s > 0:  "E" tiles: the scan from a zero state (U as is, no outputs): the affine
//             offset E[s] = N_last + M_last (... N_first); "I" tiles (columns of dk):
//             the scan with U = 0 from the identity: the transition
//             A[s] = M_last ... M_first (dk x dk).
//   cp_combine: per (value head, 16 state columns), sequential over segments:
//             E[s] <- A[s] E[s-1] + E[s] for s = 1 .. segs - 2 (f32), so E[s] is the true
//             end state of segment s.
//   MODE_CP_C (scan_cp_c): per (segment s >= 1, value head, column tile): the ordinary
//             scan of segment s from E[s-1] (outputs o; the last segment writes the
//             committed / running states and gsum_running).
// Critical path ~ 2 seg_len chunks instead of nch; work ~ (2 + dk/dv) x the scan.
constexpr int MODE_SCAN = 0, MODE_CP_A = 1, MODE_CP_C = 2;

// Segment length (chunks) and segment count of a sequence of nch chunks.
__device__ __forceinline__ void cp_geometry(int nch, int segments, int* seg_len, int* segs) {
    const int sl = max(1, (nch + segments - 1) / segments);
    *seg_len = sl;
    *segs = max(1, (nch + sl - 1) / sl);
}

template <typename T, int DK, int DV, int BV, int NW, int STAGES>
__device__ void scan_split(const NatslGdnPrefillParams& p) {
    constexpr int NT = NW * 32;
    constexpr int LDK = DK + PAD, LDB = BV + PAD, LDP = C + PAD;
    constexpr int ST_Q = 0, ST_K = C * LDK, ST_W = 2 * C * LDK, ST_P = 3 * C * LDK, ST_U = ST_P + C * LDP;
    constexpr int STAGE = ST_U + C * LDB;  // elements of T in the operand stage
    // Token phase: warps as 4 (16-row tiles) x NG (column groups of the BV tile).
    constexpr int NG = NW / 4, NTV = BV / NG / 8;
    // State phase: warp w owns state rows [w * RW, (w + 1) * RW), all BV columns.
    constexpr int RW = DK / NW, MTS = RW / 16, NTS = BV / 8;
    static_assert(NW % 4 == 0 && BV % (NG * 16) == 0 && RW % 16 == 0 && DV % BV == 0, "bad scan tile");
    static_assert(STAGES == 1, "scan: one operand stage with split prefetch");
    static_assert(NT >= 3 * C / 4, "scan: F copy needs 48 threads");

    extern __shared__ __align__(16) unsigned char smem[];
    T* st = reinterpret_cast<T*>(smem);
    T* sS = st + STAGE;                                   // [DK][LDB] state slice, storage dtype
    T* sVn = sS + DK * LDB;                               // [C][LDB] v_new
    T* sVk = sVn + C * LDB;                               // [C][LDB] diag(fk) v_new
    float* sF = reinterpret_cast<float*>(sVk + C * LDB);  // [3][C] fq, fk, G

    const int vt = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int Hv = p.num_v_heads;
    const int hq = h / (Hv / p.num_qk_heads);
    const int bos = p.batch.cu_seqlens[n];
    const int len_seq = p.batch.cu_seqlens[n + 1] - bos;
    const int nch = (len_seq + C - 1) / C;
    const int base = slot_base(p.batch.cu_seqlens, n);
    const int col0 = vt * BV;
    const T* gq = reinterpret_cast<const T*>(p.q) + (i64)hq * p.q_stride_h;
    const T* gk = reinterpret_cast<const T*>(p.k) + (i64)hq * p.k_stride_h;
    const T* gw = reinterpret_cast<const T*>(p.ws_w);
    const T* gu = reinterpret_cast<const T*>(p.ws_u);
    const T* gp = reinterpret_cast<const T*>(p.ws_p);

    // Group A (Q, W, U, F): read only in phase 1, so it is issued at B1.
    auto issue_a = [&](int cc) {
        if (cc < nch) {
            const int tt = bos + cc * C, ln = min(C, len_seq - cc * C);
            const i64 wrow = (i64)(base + cc) * Hv + h;
            load_rows_async<T, C, DK, NT>(st + ST_Q, LDK, gq + (i64)tt * p.q_stride_t, p.q_stride_t, ln);
            load_rows_async<T, C, DK, NT>(st + ST_W, LDK, gw + wrow * C * DK, DK, C);
            load_rows_async<T, C, BV, NT>(st + ST_U, LDB, gu + wrow * C * DV + col0, DV, C);
            if (tid < 3 * C / 4) cp_async16(sF + tid * 4, p.ws_g + wrow * (3 * C) + tid * 4);
        }
        cp_async_commit();
    };
    // Group B (K, P): read in phase 2, issued at B2.
    auto issue_b = [&](int cc) {
        if (cc < nch) {
            const int tt = bos + cc * C, ln = min(C, len_seq - cc * C);
            const i64 wrow = (i64)(base + cc) * Hv + h;
            load_rows_async<T, C, DK, NT>(st + ST_K, LDK, gk + (i64)tt * p.k_stride_t, p.k_stride_t, ln);
            load_rows_async<T, C, C, NT>(st + ST_P, LDP, gp + wrow * C * C, C, C);
        }
        cp_async_commit();
    };

    // State slice in registers (accumulator layout): rows srow0 + mi*16 + lane/4 (+8),
    // columns ni*8 + (lane%4)*2 (+1) of the tile.
    const int srow0 = warp * RW;
    float S[MTS][NTS][4];
    {
        const float* h0 = nullptr;
        if (p.h0_pool) h0 = p.h0_pool + ((i64)(p.h0_index ? p.h0_index[n] : n) * Hv + h) * DK * DV;
#pragma unroll
        for (int mi = 0; mi < MTS; ++mi)
#pragma unroll
            for (int ni = 0; ni < NTS; ++ni) {
                const int r = srow0 + mi * 16 + lane / 4, cc = col0 + ni * 8 + (lane % 4) * 2;
                if (h0) {
                    const float2 a = *reinterpret_cast<const float2*>(h0 + (i64)r * DV + cc);
                    const float2 b = *reinterpret_cast<const float2*>(h0 + (i64)(r + 8) * DV + cc);
                    S[mi][ni][0] = a.x; S[mi][ni][1] = a.y; S[mi][ni][2] = b.x; S[mi][ni][3] = b.y;
                } else {
                    S[mi][ni][0] = S[mi][ni][1] = S[mi][ni][2] = S[mi][ni][3] = 0.f;
                }
            }
    }
    auto write_smem_state = [&]() {
#pragma unroll
        for (int mi = 0; mi < MTS; ++mi)
#pragma unroll
            for (int ni = 0; ni < NTS; ++ni) {
                const int r = srow0 + mi * 16 + lane / 4, cc = ni * 8 + (lane % 4) * 2;
                *reinterpret_cast<u32*>(sS + r * LDB + cc) = pack2<T>(S[mi][ni][0], S[mi][ni][1]);
                *reinterpret_cast<u32*>(sS + (r + 8) * LDB + cc) = pack2<T>(S[mi][ni][2], S[mi][ni][3]);
            }
    };
    auto write_pool = [&](float* pool, const int* index) {
        float* dst = pool + ((i64)(index ? index[n] : n) * Hv + h) * DK * DV;
#pragma unroll
        for (int mi = 0; mi < MTS; ++mi)
#pragma unroll
            for (int ni = 0; ni < NTS; ++ni) {
                const int r = srow0 + mi * 16 + lane / 4, cc = col0 + ni * 8 + (lane % 4) * 2;
                *reinterpret_cast<float2*>(dst + (i64)r * DV + cc) = make_float2(S[mi][ni][0], S[mi][ni][1]);
                *reinterpret_cast<float2*>(dst + (i64)(r + 8) * DV + cc) = make_float2(S[mi][ni][2], S[mi][ni][3]);
            }
    };

    issue_a(0);
    issue_b(0);
    write_smem_state();

    const int mt = warp % 4, ng = warp / 4;
    const int tm0 = mt * 16, tn0 = ng * NTV * 8;
    const int hr = p.labels ? h / (Hv / p.num_r_heads) : 0;
    float glast_final = 0.f;
    bool last_complete = true;
    T* go_seq = reinterpret_cast<T*>(p.o) + (i64)bos * p.o_stride_t + (i64)h * p.o_stride_h + col0;

    for (int c = 0; c < nch; ++c) {
        const int ln = min(C, len_seq - c * C);
        const bool complete = ln == C, last = c == nch - 1;
        // Group A of chunk c (issued at B1 of chunk c - 1) only: group B (K, P, issued
        // at the last B2) is waited for at B1, so it lands under phase 1.
        cp_async_wait<1>();
        __syncthreads();  // S0
        const float GL = sF[2 * C + C - 1];

        // Phase 1: v_new = U - W S and o = Q S (shared B fragments of S).
        float aw[NTV][4], ao[NTV][4];
#pragma unroll
        for (int i = 0; i < NTV; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) aw[i][e] = ao[i][e] = 0.f;
#pragma unroll 2
        for (int k0 = 0; k0 < DK; k0 += 16) {
            u32 a1[4], a2[4];
            frag_a(a1, st + ST_W, LDK * 2, tm0, k0 * 2);
            frag_a(a2, st + ST_Q, LDK * 2, tm0, k0 * 2);
#pragma unroll
            for (int nt = 0; nt < NTV; nt += 2) {
                u32 b[4];
                frag_b2_kn(b, sS, LDB * 2, k0, (tn0 + nt * 8) * 2);
                mma_16816<T>(aw[nt], a1, b);
                mma_16816<T>(aw[nt + 1], a1, b + 2);
                mma_16816<T>(ao[nt], a2, b);
                mma_16816<T>(ao[nt + 1], a2, b + 2);
            }
        }
        {
            const T* sU = st + ST_U;
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = tm0 + lane / 4 + hf * 8;
                const float fq = sF[r], fk = sF[C + r];
#pragma unroll
                for (int nt = 0; nt < NTV; ++nt) {
                    const int cc = tn0 + nt * 8 + (lane % 4) * 2;
                    const u32 u = *reinterpret_cast<const u32*>(sU + r * LDB + cc);
                    const float v0 = lo_f32<T>(u) - aw[nt][hf * 2], v1 = hi_f32<T>(u) - aw[nt][hf * 2 + 1];
                    *reinterpret_cast<u32*>(sVn + r * LDB + cc) = pack2<T>(v0, v1);
                    *reinterpret_cast<u32*>(sVk + r * LDB + cc) = pack2<T>(v0 * fk, v1 * fk);
                    ao[nt][hf * 2] *= fq;
                    ao[nt][hf * 2 + 1] *= fq;
                }
            }
        }
        cp_async_wait<0>();  // group B of chunk c (K, P): read from phase 2 on
        __syncthreads();  // B1
        issue_a(c + 1);

        // Phase 2: o += P v_new, straight to global (4-byte stores, 16 bytes per row and quad).
#pragma unroll
        for (int k0 = 0; k0 < C; k0 += 16) {
            if (k0 > tm0 + 15) break;  // P is lower triangular
            u32 a[4];
            frag_a(a, st + ST_P, LDP * 2, tm0, k0 * 2);
#pragma unroll
            for (int nt = 0; nt < NTV; nt += 2) {
                u32 b[4];
                frag_b2_kn(b, sVn, LDB * 2, k0, (tn0 + nt * 8) * 2);
                mma_16816<T>(ao[nt], a, b);
                mma_16816<T>(ao[nt + 1], a, b + 2);
            }
        }
        {
            T* go = go_seq + (i64)(c * C) * p.o_stride_t;
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = tm0 + lane / 4 + hf * 8;
                if (r < ln) {
#pragma unroll
                    for (int nt = 0; nt < NTV; ++nt) {
                        const int cc = tn0 + nt * 8 + (lane % 4) * 2;
                        *reinterpret_cast<u32*>(go + (i64)r * p.o_stride_t + cc) = pack2<T>(ao[nt][hf * 2], ao[nt][hf * 2 + 1]);
                    }
                }
            }
        }

        // State update with the commit rule: S <- e^{G_L} S (+ K^T diag(fk) v_new for GDN).
        int label = NATSL_LABEL_GDN;
        if (complete && p.labels) label = p.labels[(i64)(base + c) * p.num_r_heads + hr];
        if (last && !complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index);
        const float eg = __expf(GL);
#pragma unroll
        for (int mi = 0; mi < MTS; ++mi)
#pragma unroll
            for (int ni = 0; ni < NTS; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) S[mi][ni][e] *= eg;
        if (label != NATSL_LABEL_ATTN) {
#pragma unroll
            for (int k0 = 0; k0 < C; k0 += 16) {
                u32 b[NTS / 2][4];
#pragma unroll
                for (int ni = 0; ni < NTS; ni += 2) frag_b2_kn(b[ni / 2], sVk, LDB * 2, k0, ni * 8 * 2);
#pragma unroll
                for (int mi = 0; mi < MTS; ++mi) {
                    u32 a[4];
                    frag_a_trans(a, st + ST_K, LDK * 2, k0, (srow0 + mi * 16) * 2);
#pragma unroll
                    for (int ni = 0; ni < NTS; ni += 2) {
                        mma_16816<T>(S[mi][ni], a, b[ni / 2]);
                        mma_16816<T>(S[mi][ni + 1], a, b[ni / 2] + 2);
                    }
                }
            }
        }
        if (!last) write_smem_state();  // phase-1 reads of sS all finished before B1
        if (last) {
            last_complete = complete;
            glast_final = complete ? 0.f : GL;
        }
        __syncthreads();  // B2
        issue_b(c + 1);
    }
    cp_async_wait<0>();

    if (last_complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index);
    if (p.running_pool) write_pool(p.running_pool, p.running_index);
    if (p.gsum_running && vt == 0 && tid == 0) p.gsum_running[(i64)n * Hv + h] = glast_final;
}

// Two operand stages (ScanTile::Staged, tile stages = 2): chunk c + 1's operands are
// all issued right after S0 of chunk c, so a whole chunk step hides their latency, and
// the loop has two barriers per chunk (S0 doubles as the old B2). For the latency-bound
// launches (one CTA per SM: few sequences x heads, P4 / P5 / P9), where the split-prefetch
// scan exposes part of each chunk's load latency. Smem: two stages + state (dk 128: narrow
// 154 KB, wide 179 KB: one CTA per SM). Context parallelism keeps the one-stage scan_cp.
template <typename T, int DK, int DV, int BV, int NW, int STAGES>
__device__ void scan_staged(const NatslGdnPrefillParams& p) {
    constexpr int NT = NW * 32;
    constexpr int LDK = DK + PAD, LDB = BV + PAD, LDP = C + PAD;
    constexpr int ST_Q = 0, ST_K = C * LDK, ST_W = 2 * C * LDK, ST_P = 3 * C * LDK, ST_U = ST_P + C * LDP;
    constexpr int STAGE = ST_U + C * LDB;  // elements of T in the operand stage
    // Token phase: warps as 4 (16-row tiles) x NG (column groups of the BV tile).
    constexpr int NG = NW / 4, NTV = BV / NG / 8;
    // State phase: warp w owns state rows [w * RW, (w + 1) * RW), all BV columns.
    constexpr int RW = DK / NW, MTS = RW / 16, NTS = BV / 8;
    static_assert(NW % 4 == 0 && BV % (NG * 16) == 0 && RW % 16 == 0 && DV % BV == 0, "bad scan tile");
    static_assert(STAGES == 2, "scan_staged: two operand stages");
    static_assert(NT >= 3 * C / 4, "scan: F copy needs 48 threads");

    extern __shared__ __align__(16) unsigned char smem[];
    T* st0 = reinterpret_cast<T*>(smem);                  // [2][STAGE] operand stages
    T* sS = st0 + 2 * STAGE;                              // [DK][LDB] state slice, storage dtype
    T* sVn = sS + DK * LDB;                               // [C][LDB] v_new
    T* sVk = sVn + C * LDB;                               // [C][LDB] diag(fk) v_new
    float* sF0 = reinterpret_cast<float*>(sVk + C * LDB); // [2][3][C] fq, fk, G per stage

    const int vt = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int Hv = p.num_v_heads;
    const int hq = h / (Hv / p.num_qk_heads);
    const int bos = p.batch.cu_seqlens[n];
    const int len_seq = p.batch.cu_seqlens[n + 1] - bos;
    const int nch = (len_seq + C - 1) / C;
    const int base = slot_base(p.batch.cu_seqlens, n);
    const int col0 = vt * BV;
    const T* gq = reinterpret_cast<const T*>(p.q) + (i64)hq * p.q_stride_h;
    const T* gk = reinterpret_cast<const T*>(p.k) + (i64)hq * p.k_stride_h;
    const T* gw = reinterpret_cast<const T*>(p.ws_w);
    const T* gu = reinterpret_cast<const T*>(p.ws_u);
    const T* gp = reinterpret_cast<const T*>(p.ws_p);

    // All operands of chunk cc (one cp.async group) into stage cc & 1.
    auto issue = [&](int cc) {
        if (cc < nch) {
            T* st = st0 + (cc & 1) * STAGE;
            float* sF = sF0 + (cc & 1) * 3 * C;
            const int tt = bos + cc * C, ln = min(C, len_seq - cc * C);
            const i64 wrow = (i64)(base + cc) * Hv + h;
            load_rows_async<T, C, DK, NT>(st + ST_Q, LDK, gq + (i64)tt * p.q_stride_t, p.q_stride_t, ln);
            load_rows_async<T, C, DK, NT>(st + ST_W, LDK, gw + wrow * C * DK, DK, C);
            load_rows_async<T, C, BV, NT>(st + ST_U, LDB, gu + wrow * C * DV + col0, DV, C);
            if (tid < 3 * C / 4) cp_async16(sF + tid * 4, p.ws_g + wrow * (3 * C) + tid * 4);
            load_rows_async<T, C, DK, NT>(st + ST_K, LDK, gk + (i64)tt * p.k_stride_t, p.k_stride_t, ln);
            load_rows_async<T, C, C, NT>(st + ST_P, LDP, gp + wrow * C * C, C, C);
        }
        cp_async_commit();
    };

    // State slice in registers (accumulator layout): rows srow0 + mi*16 + lane/4 (+8),
    // columns ni*8 + (lane%4)*2 (+1) of the tile.
    const int srow0 = warp * RW;
    float S[MTS][NTS][4];
    {
        const float* h0 = nullptr;
        if (p.h0_pool) h0 = p.h0_pool + ((i64)(p.h0_index ? p.h0_index[n] : n) * Hv + h) * DK * DV;
#pragma unroll
        for (int mi = 0; mi < MTS; ++mi)
#pragma unroll
            for (int ni = 0; ni < NTS; ++ni) {
                const int r = srow0 + mi * 16 + lane / 4, cc = col0 + ni * 8 + (lane % 4) * 2;
                if (h0) {
                    const float2 a = *reinterpret_cast<const float2*>(h0 + (i64)r * DV + cc);
                    const float2 b = *reinterpret_cast<const float2*>(h0 + (i64)(r + 8) * DV + cc);
                    S[mi][ni][0] = a.x; S[mi][ni][1] = a.y; S[mi][ni][2] = b.x; S[mi][ni][3] = b.y;
                } else {
                    S[mi][ni][0] = S[mi][ni][1] = S[mi][ni][2] = S[mi][ni][3] = 0.f;
                }
            }
    }
    auto write_smem_state = [&]() {
#pragma unroll
        for (int mi = 0; mi < MTS; ++mi)
#pragma unroll
            for (int ni = 0; ni < NTS; ++ni) {
                const int r = srow0 + mi * 16 + lane / 4, cc = ni * 8 + (lane % 4) * 2;
                *reinterpret_cast<u32*>(sS + r * LDB + cc) = pack2<T>(S[mi][ni][0], S[mi][ni][1]);
                *reinterpret_cast<u32*>(sS + (r + 8) * LDB + cc) = pack2<T>(S[mi][ni][2], S[mi][ni][3]);
            }
    };
    auto write_pool = [&](float* pool, const int* index) {
        float* dst = pool + ((i64)(index ? index[n] : n) * Hv + h) * DK * DV;
#pragma unroll
        for (int mi = 0; mi < MTS; ++mi)
#pragma unroll
            for (int ni = 0; ni < NTS; ++ni) {
                const int r = srow0 + mi * 16 + lane / 4, cc = col0 + ni * 8 + (lane % 4) * 2;
                *reinterpret_cast<float2*>(dst + (i64)r * DV + cc) = make_float2(S[mi][ni][0], S[mi][ni][1]);
                *reinterpret_cast<float2*>(dst + (i64)(r + 8) * DV + cc) = make_float2(S[mi][ni][2], S[mi][ni][3]);
            }
    };

    issue(0);
    write_smem_state();

    const int mt = warp % 4, ng = warp / 4;
    const int tm0 = mt * 16, tn0 = ng * NTV * 8;
    const int hr = p.labels ? h / (Hv / p.num_r_heads) : 0;
    float glast_final = 0.f;
    bool last_complete = true;
    T* go_seq = reinterpret_cast<T*>(p.o) + (i64)bos * p.o_stride_t + (i64)h * p.o_stride_h + col0;

    for (int c = 0; c < nch; ++c) {
        const int ln = min(C, len_seq - c * C);
        const bool complete = ln == C, last = c == nch - 1;
        const T* st = st0 + (c & 1) * STAGE;
        const float* sF = sF0 + (c & 1) * 3 * C;
        // Chunk c's operands (issued a whole chunk ago) landed; every warp is done with
        // chunk c - 1 (its stage, v_new, and the state copy written at its end).
        cp_async_wait<0>();
        __syncthreads();  // S0
        issue(c + 1);     // into the stage chunk c - 1 used
        const float GL = sF[2 * C + C - 1];

        // Phase 1: v_new = U - W S and o = Q S (shared B fragments of S).
        float aw[NTV][4], ao[NTV][4];
#pragma unroll
        for (int i = 0; i < NTV; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) aw[i][e] = ao[i][e] = 0.f;
#pragma unroll 2
        for (int k0 = 0; k0 < DK; k0 += 16) {
            u32 a1[4], a2[4];
            frag_a(a1, st + ST_W, LDK * 2, tm0, k0 * 2);
            frag_a(a2, st + ST_Q, LDK * 2, tm0, k0 * 2);
#pragma unroll
            for (int nt = 0; nt < NTV; nt += 2) {
                u32 b[4];
                frag_b2_kn(b, sS, LDB * 2, k0, (tn0 + nt * 8) * 2);
                mma_16816<T>(aw[nt], a1, b);
                mma_16816<T>(aw[nt + 1], a1, b + 2);
                mma_16816<T>(ao[nt], a2, b);
                mma_16816<T>(ao[nt + 1], a2, b + 2);
            }
        }
        {
            const T* sU = st + ST_U;
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = tm0 + lane / 4 + hf * 8;
                const float fq = sF[r], fk = sF[C + r];
#pragma unroll
                for (int nt = 0; nt < NTV; ++nt) {
                    const int cc = tn0 + nt * 8 + (lane % 4) * 2;
                    const u32 u = *reinterpret_cast<const u32*>(sU + r * LDB + cc);
                    const float v0 = lo_f32<T>(u) - aw[nt][hf * 2], v1 = hi_f32<T>(u) - aw[nt][hf * 2 + 1];
                    *reinterpret_cast<u32*>(sVn + r * LDB + cc) = pack2<T>(v0, v1);
                    *reinterpret_cast<u32*>(sVk + r * LDB + cc) = pack2<T>(v0 * fk, v1 * fk);
                    ao[nt][hf * 2] *= fq;
                    ao[nt][hf * 2 + 1] *= fq;
                }
            }
        }
        __syncthreads();  // B1

        // Phase 2: o += P v_new, straight to global (4-byte stores, 16 bytes per row and quad).
#pragma unroll
        for (int k0 = 0; k0 < C; k0 += 16) {
            if (k0 > tm0 + 15) break;  // P is lower triangular
            u32 a[4];
            frag_a(a, st + ST_P, LDP * 2, tm0, k0 * 2);
#pragma unroll
            for (int nt = 0; nt < NTV; nt += 2) {
                u32 b[4];
                frag_b2_kn(b, sVn, LDB * 2, k0, (tn0 + nt * 8) * 2);
                mma_16816<T>(ao[nt], a, b);
                mma_16816<T>(ao[nt + 1], a, b + 2);
            }
        }
        {
            T* go = go_seq + (i64)(c * C) * p.o_stride_t;
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = tm0 + lane / 4 + hf * 8;
                if (r < ln) {
#pragma unroll
                    for (int nt = 0; nt < NTV; ++nt) {
                        const int cc = tn0 + nt * 8 + (lane % 4) * 2;
                        *reinterpret_cast<u32*>(go + (i64)r * p.o_stride_t + cc) = pack2<T>(ao[nt][hf * 2], ao[nt][hf * 2 + 1]);
                    }
                }
            }
        }

        // State update with the commit rule: S <- e^{G_L} S (+ K^T diag(fk) v_new for GDN).
        int label = NATSL_LABEL_GDN;
        if (complete && p.labels) label = p.labels[(i64)(base + c) * p.num_r_heads + hr];
        if (last && !complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index);
        const float eg = __expf(GL);
#pragma unroll
        for (int mi = 0; mi < MTS; ++mi)
#pragma unroll
            for (int ni = 0; ni < NTS; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) S[mi][ni][e] *= eg;
        if (label != NATSL_LABEL_ATTN) {
#pragma unroll
            for (int k0 = 0; k0 < C; k0 += 16) {
                u32 b[NTS / 2][4];
#pragma unroll
                for (int ni = 0; ni < NTS; ni += 2) frag_b2_kn(b[ni / 2], sVk, LDB * 2, k0, ni * 8 * 2);
#pragma unroll
                for (int mi = 0; mi < MTS; ++mi) {
                    u32 a[4];
                    frag_a_trans(a, st + ST_K, LDK * 2, k0, (srow0 + mi * 16) * 2);
#pragma unroll
                    for (int ni = 0; ni < NTS; ni += 2) {
                        mma_16816<T>(S[mi][ni], a, b[ni / 2]);
                        mma_16816<T>(S[mi][ni + 1], a, b[ni / 2] + 2);
                    }
                }
            }
        }
        if (!last) write_smem_state();  // phase-1 reads of sS all finished before B1
        if (last) {
            last_complete = complete;
            glast_final = complete ? 0.f : GL;
        }
    }
    cp_async_wait<0>();

    if (last_complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index);
    if (p.running_pool) write_pool(p.running_pool, p.running_index);
    if (p.gsum_running && vt == 0 && tid == 0) p.gsum_running[(i64)n * Hv + h] = glast_final;
}

// Entry `scan`: the split-prefetch scan (one stage, the shipped tiles) or, with a
// two-stage tile, scan_staged.
template <typename T, int DK, int DV, int BV, int NW, int STAGES>
__device__ void scan(const NatslGdnPrefillParams& p) {
    if constexpr (STAGES == 2) scan_staged<T, DK, DV, BV, NW, STAGES>(p);
    else scan_split<T, DK, DV, BV, NW, STAGES>(p);
}

// The context-parallel passes (MODE_CP_A / MODE_CP_C): the scan above with segment
// geometry, zero / identity / E start states and the segment-end writes (a copy, so
// the plain scan's code stays exactly as validated).
template <typename T, int DK, int DV, int BV, int NW, int STAGES, int MODE>
__device__ void scan_cp(const NatslGdnPrefillParams& p) {
    constexpr int NT = NW * 32;
    constexpr int LDK = DK + PAD, LDB = BV + PAD, LDP = C + PAD;
    constexpr int ST_Q = 0, ST_K = C * LDK, ST_W = 2 * C * LDK, ST_P = 3 * C * LDK, ST_U = ST_P + C * LDP;
    constexpr int STAGE = ST_U + C * LDB;  // elements of T in the operand stage
    // Token phase: warps as 4 (16-row tiles) x NG (column groups of the BV tile).
    constexpr int NG = NW / 4, NTV = BV / NG / 8;
    // State phase: warp w owns state rows [w * RW, (w + 1) * RW), all BV columns.
    constexpr int RW = DK / NW, MTS = RW / 16, NTS = BV / 8;
    static_assert(NW % 4 == 0 && BV % (NG * 16) == 0 && RW % 16 == 0 && DV % BV == 0, "bad scan tile");
    static_assert(STAGES == 1 || STAGES == 2, "scan_cp: one operand stage with split prefetch (a two-stage tile's smem is larger: unused)");
    static_assert(NT >= 3 * C / 4, "scan: F copy needs 48 threads");

    extern __shared__ __align__(16) unsigned char smem[];
    T* st = reinterpret_cast<T*>(smem);
    T* sS = st + STAGE;                                   // [DK][LDB] state slice, storage dtype
    T* sVn = sS + DK * LDB;                               // [C][LDB] v_new
    T* sVk = sVn + C * LDB;                               // [C][LDB] diag(fk) v_new
    float* sF = reinterpret_cast<float*>(sVk + C * LDB);  // [3][C] fq, fk, G

    const int h = blockIdx.y, n = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int Hv = p.num_v_heads;
    const int hq = h / (Hv / p.num_qk_heads);
    int bos = p.batch.cu_seqlens[n];
    int len_seq = p.batch.cu_seqlens[n + 1] - bos;
    int nch = (len_seq + C - 1) / C;
    int base = slot_base(p.batch.cu_seqlens, n);
    // Context parallelism: this CTA's segment becomes a sequence of its own (bos, len_seq,
    // nch, base shifted to the segment's chunks); ident: U = 0 from the identity (columns
    // of dk); want_o: outputs are written; final_seg: the segment ends the sequence.
    int vt = blockIdx.x, seg = 0;
    bool ident = false, want_o = true, final_seg = true;
    if (MODE != MODE_SCAN) {
        static_assert(MODE == MODE_SCAN || DK % BV == 0, "scan_cp_a: identity tiles need BV | dk");
        constexpr int TV = DV / BV, TK = DK / BV;
        int seg_len, segs;
        cp_geometry(nch, p.cp_segments, &seg_len, &segs);
        if (MODE == MODE_CP_A) {
            seg = blockIdx.x / (TK + TV);
            const int t = blockIdx.x % (TK + TV);
            ident = t < TK;
            if (seg >= segs || (seg > 0 && seg == segs - 1) || (seg == 0 && ident)) return;
            vt = ident ? t : t - TK;
            want_o = seg == 0;
        } else {
            seg = 1 + blockIdx.x / TV;
            vt = blockIdx.x % TV;
            if (seg >= segs) return;
        }
        const int c_begin = seg * seg_len, c_end = min(nch, c_begin + seg_len);
        final_seg = c_end == nch;
        bos += c_begin * C;
        len_seq = min(len_seq - c_begin * C, (c_end - c_begin) * C);
        base += c_begin;
        nch = c_end - c_begin;
    }
    // CP modes keep the segment geometry in smem (re-read at each use: the CP entries
    // have a few more live values than the plain scan, whose budget is near 255 regs).
    __shared__ int s_geo[4];
    if (MODE != MODE_SCAN) {
        if (tid == 0) {
            s_geo[0] = bos;
            s_geo[1] = len_seq;
            s_geo[2] = base;
            s_geo[3] = nch;
        }
        __syncthreads();
    }
    auto geo = [&](int i, int v) { return MODE == MODE_SCAN ? v : *reinterpret_cast<volatile int*>(s_geo + i); };
    const int col0 = vt * BV;
    // Context-parallel state buffers of this (sequence, value head): E [seg][DK][DV], A [seg][DK][DK].
    const i64 cp_row = ((i64)n * p.cp_segments + seg) * Hv + h;
    const T* gq = reinterpret_cast<const T*>(p.q) + (i64)hq * p.q_stride_h;
    const T* gk = reinterpret_cast<const T*>(p.k) + (i64)hq * p.k_stride_h;
    const T* gw = reinterpret_cast<const T*>(p.ws_w);
    const T* gu = reinterpret_cast<const T*>(p.ws_u);
    const T* gp = reinterpret_cast<const T*>(p.ws_p);

    // Group A (Q, W, U, F): read only in phase 1, so it is issued at B1.
    auto issue_a = [&](int cc) {
        if (cc < geo(3, nch)) {
            const int tt = geo(0, bos) + cc * C, ln = min(C, geo(1, len_seq) - cc * C);
            const i64 wrow = (i64)(geo(2, base) + cc) * Hv + h;
            if (want_o) load_rows_async<T, C, DK, NT>(st + ST_Q, LDK, gq + (i64)tt * p.q_stride_t, p.q_stride_t, ln);
            load_rows_async<T, C, DK, NT>(st + ST_W, LDK, gw + wrow * C * DK, DK, C);
            if (!ident) load_rows_async<T, C, BV, NT>(st + ST_U, LDB, gu + wrow * C * DV + col0, DV, C);
            if (tid < 3 * C / 4) cp_async16(sF + tid * 4, p.ws_g + wrow * (3 * C) + tid * 4);
        }
        cp_async_commit();
    };
    // Group B (K, P): read in phase 2, issued at B2.
    auto issue_b = [&](int cc) {
        if (cc < geo(3, nch)) {
            const int tt = geo(0, bos) + cc * C, ln = min(C, geo(1, len_seq) - cc * C);
            const i64 wrow = (i64)(geo(2, base) + cc) * Hv + h;
            load_rows_async<T, C, DK, NT>(st + ST_K, LDK, gk + (i64)tt * p.k_stride_t, p.k_stride_t, ln);
            if (want_o) load_rows_async<T, C, C, NT>(st + ST_P, LDP, gp + wrow * C * C, C, C);
        }
        cp_async_commit();
    };

    // State slice in registers (accumulator layout): rows srow0 + mi*16 + lane/4 (+8),
    // columns ni*8 + (lane%4)*2 (+1) of the tile.
    const int srow0 = warp * RW;
    float S[MTS][NTS][4];
    {
        // Start state: h0 (or zeros); context parallelism: zeros / identity (pass A,
        // segments > 0) or the true start state E[seg - 1] (pass C).
        const float* h0 = nullptr;
        if (seg == 0) {
            if (p.h0_pool) h0 = p.h0_pool + ((i64)(p.h0_index ? p.h0_index[n] : n) * Hv + h) * DK * DV;
        } else if (MODE == MODE_CP_C) {
            h0 = p.ws_cp_e + (cp_row - Hv) * DK * DV;
        }
#pragma unroll
        for (int mi = 0; mi < MTS; ++mi)
#pragma unroll
            for (int ni = 0; ni < NTS; ++ni) {
                const int r = srow0 + mi * 16 + lane / 4, cc = col0 + ni * 8 + (lane % 4) * 2;
                if (ident) {
                    S[mi][ni][0] = r == cc ? 1.f : 0.f;
                    S[mi][ni][1] = r == cc + 1 ? 1.f : 0.f;
                    S[mi][ni][2] = r + 8 == cc ? 1.f : 0.f;
                    S[mi][ni][3] = r + 8 == cc + 1 ? 1.f : 0.f;
                } else if (h0) {
                    const float2 a = *reinterpret_cast<const float2*>(h0 + (i64)r * DV + cc);
                    const float2 b = *reinterpret_cast<const float2*>(h0 + (i64)(r + 8) * DV + cc);
                    S[mi][ni][0] = a.x; S[mi][ni][1] = a.y; S[mi][ni][2] = b.x; S[mi][ni][3] = b.y;
                } else {
                    S[mi][ni][0] = S[mi][ni][1] = S[mi][ni][2] = S[mi][ni][3] = 0.f;
                }
            }
    }
    auto write_smem_state = [&]() {
#pragma unroll
        for (int mi = 0; mi < MTS; ++mi)
#pragma unroll
            for (int ni = 0; ni < NTS; ++ni) {
                const int r = srow0 + mi * 16 + lane / 4, cc = ni * 8 + (lane % 4) * 2;
                *reinterpret_cast<u32*>(sS + r * LDB + cc) = pack2<T>(S[mi][ni][0], S[mi][ni][1]);
                *reinterpret_cast<u32*>(sS + (r + 8) * LDB + cc) = pack2<T>(S[mi][ni][2], S[mi][ni][3]);
            }
    };
    auto write_state = [&](float* dst, int ld) {
#pragma unroll
        for (int mi = 0; mi < MTS; ++mi)
#pragma unroll
            for (int ni = 0; ni < NTS; ++ni) {
                const int r = srow0 + mi * 16 + lane / 4, cc = col0 + ni * 8 + (lane % 4) * 2;
                *reinterpret_cast<float2*>(dst + (i64)r * ld + cc) = make_float2(S[mi][ni][0], S[mi][ni][1]);
                *reinterpret_cast<float2*>(dst + (i64)(r + 8) * ld + cc) = make_float2(S[mi][ni][2], S[mi][ni][3]);
            }
    };
    auto write_pool = [&](float* pool, const int* index) {
        write_state(pool + ((i64)(index ? index[n] : n) * Hv + h) * DK * DV, DV);
    };

    issue_a(0);
    issue_b(0);
    write_smem_state();

    const int mt = warp % 4, ng = warp / 4;
    const int tm0 = mt * 16, tn0 = ng * NTV * 8;
    const int hr = p.labels ? h / (Hv / p.num_r_heads) : 0;
    float glast_final = 0.f;
    bool last_complete = true;
    T* go_seq = reinterpret_cast<T*>(p.o) + (i64)(MODE == MODE_SCAN ? bos : 0) * p.o_stride_t + (i64)h * p.o_stride_h + col0;

    for (int c = 0; c < geo(3, nch); ++c) {
        const int ln = min(C, geo(1, len_seq) - c * C);
        const bool complete = ln == C, last = c == geo(3, nch) - 1;
        // Group A of chunk c (issued at B1 of chunk c - 1) only: group B (K, P, issued
        // at the last B2) is waited for at B1, so it lands under phase 1.
        cp_async_wait<1>();
        __syncthreads();  // S0
        const float GL = sF[2 * C + C - 1];

        // Phase 1: v_new = U - W S and o = Q S (shared B fragments of S).
        float aw[NTV][4], ao[NTV][4];
#pragma unroll
        for (int i = 0; i < NTV; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) aw[i][e] = ao[i][e] = 0.f;
#pragma unroll 2
        for (int k0 = 0; k0 < DK; k0 += 16) {
            u32 a1[4], a2[4];
            frag_a(a1, st + ST_W, LDK * 2, tm0, k0 * 2);
            if (want_o) frag_a(a2, st + ST_Q, LDK * 2, tm0, k0 * 2);
#pragma unroll
            for (int nt = 0; nt < NTV; nt += 2) {
                u32 b[4];
                frag_b2_kn(b, sS, LDB * 2, k0, (tn0 + nt * 8) * 2);
                mma_16816<T>(aw[nt], a1, b);
                mma_16816<T>(aw[nt + 1], a1, b + 2);
                if (want_o) {
                    mma_16816<T>(ao[nt], a2, b);
                    mma_16816<T>(ao[nt + 1], a2, b + 2);
                }
            }
        }
        {
            const T* sU = st + ST_U;
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = tm0 + lane / 4 + hf * 8;
                const float fq = sF[r], fk = sF[C + r];
#pragma unroll
                for (int nt = 0; nt < NTV; ++nt) {
                    const int cc = tn0 + nt * 8 + (lane % 4) * 2;
                    const u32 u = ident ? 0u : *reinterpret_cast<const u32*>(sU + r * LDB + cc);
                    const float v0 = lo_f32<T>(u) - aw[nt][hf * 2], v1 = hi_f32<T>(u) - aw[nt][hf * 2 + 1];
                    *reinterpret_cast<u32*>(sVn + r * LDB + cc) = pack2<T>(v0, v1);
                    *reinterpret_cast<u32*>(sVk + r * LDB + cc) = pack2<T>(v0 * fk, v1 * fk);
                    ao[nt][hf * 2] *= fq;
                    ao[nt][hf * 2 + 1] *= fq;
                }
            }
        }
        cp_async_wait<0>();  // group B of chunk c (K, P): read from phase 2 on
        __syncthreads();  // B1
        issue_a(c + 1);

        // Phase 2: o += P v_new, straight to global (4-byte stores, 16 bytes per row and quad).
        if (want_o) {
#pragma unroll
        for (int k0 = 0; k0 < C; k0 += 16) {
            if (k0 > tm0 + 15) break;  // P is lower triangular
            u32 a[4];
            frag_a(a, st + ST_P, LDP * 2, tm0, k0 * 2);
#pragma unroll
            for (int nt = 0; nt < NTV; nt += 2) {
                u32 b[4];
                frag_b2_kn(b, sVn, LDB * 2, k0, (tn0 + nt * 8) * 2);
                mma_16816<T>(ao[nt], a, b);
                mma_16816<T>(ao[nt + 1], a, b + 2);
            }
        }
        {
            T* go = go_seq + (i64)((MODE == MODE_SCAN ? 0 : geo(0, bos)) + c * C) * p.o_stride_t;
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = tm0 + lane / 4 + hf * 8;
                if (r < ln) {
#pragma unroll
                    for (int nt = 0; nt < NTV; ++nt) {
                        const int cc = tn0 + nt * 8 + (lane % 4) * 2;
                        *reinterpret_cast<u32*>(go + (i64)r * p.o_stride_t + cc) = pack2<T>(ao[nt][hf * 2], ao[nt][hf * 2 + 1]);
                    }
                }
            }
        }
        }  // want_o

        // State update with the commit rule: S <- e^{G_L} S (+ K^T diag(fk) v_new for GDN).
        int label = NATSL_LABEL_GDN;
        if (complete && p.labels) label = p.labels[(i64)(geo(2, base) + c) * p.num_r_heads + hr];
        if (last && !complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index);
        const float eg = __expf(GL);
#pragma unroll
        for (int mi = 0; mi < MTS; ++mi)
#pragma unroll
            for (int ni = 0; ni < NTS; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) S[mi][ni][e] *= eg;
        if (label != NATSL_LABEL_ATTN) {
#pragma unroll
            for (int k0 = 0; k0 < C; k0 += 16) {
                u32 b[NTS / 2][4];
#pragma unroll
                for (int ni = 0; ni < NTS; ni += 2) frag_b2_kn(b[ni / 2], sVk, LDB * 2, k0, ni * 8 * 2);
#pragma unroll
                for (int mi = 0; mi < MTS; ++mi) {
                    u32 a[4];
                    frag_a_trans(a, st + ST_K, LDK * 2, k0, (srow0 + mi * 16) * 2);
#pragma unroll
                    for (int ni = 0; ni < NTS; ni += 2) {
                        mma_16816<T>(S[mi][ni], a, b[ni / 2]);
                        mma_16816<T>(S[mi][ni + 1], a, b[ni / 2] + 2);
                    }
                }
            }
        }
        if (!last) write_smem_state();  // phase-1 reads of sS all finished before B1
        if (last) {
            last_complete = complete;
            glast_final = complete ? 0.f : GL;
        }
        __syncthreads();  // B2
        issue_b(c + 1);
    }
    cp_async_wait<0>();

    // Context parallelism: recomputed here rather than kept live through the chunk loop.
    if (MODE != MODE_SCAN) {
        const int nch_seq = (p.batch.cu_seqlens[n + 1] - p.batch.cu_seqlens[n] + C - 1) / C;
        int seg_len, segs;
        cp_geometry(nch_seq, p.cp_segments, &seg_len, &segs);
        final_seg = (MODE == MODE_CP_A ? (int)blockIdx.x / (DK / BV + DV / BV) : 1 + (int)blockIdx.x / (DV / BV)) == segs - 1;
    }
    if (final_seg) {
        if (last_complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index);
        if (p.running_pool) write_pool(p.running_pool, p.running_index);
        if (p.gsum_running && vt == 0 && tid == 0) p.gsum_running[(i64)n * Hv + h] = glast_final;
    } else if (MODE == MODE_CP_A) {
        // Segment end (every chunk complete): transition A[seg] columns or offset / state E[seg].
        if (ident) write_state(p.ws_cp_a + cp_row * DK * DK, DK);
        else write_state(p.ws_cp_e + cp_row * DK * DV, DV);
    }
}

// Context parallelism, pass B (see scan): grid (DV / 16, Hv, N), CP_THREADS threads.
// E[s] <- A[s] E[s-1] + E[s] for s = 1 .. segs - 2, 16 state columns per CTA, f32.
// Thread (rg = tid / 4, cg = tid % 4) owns rows rg + 32 i (i < DK / 32), columns 4 cg ...
constexpr int CP_THREADS = 128, CP_COLS = 16;

template <int DK, int DV>
__device__ void cp_combine(const NatslGdnPrefillParams& p) {
    static_assert(DK % 32 == 0 && DV % CP_COLS == 0, "cp_combine tile");
    constexpr int RI = DK / 32;
    __shared__ __align__(16) float cur[DK][CP_COLS];
    const int h = blockIdx.y, n = blockIdx.z, col0 = blockIdx.x * CP_COLS;
    const int tid = threadIdx.x, rg = tid / 4, cg = tid % 4;
    const int Hv = p.num_v_heads;
    const int len_seq = p.batch.cu_seqlens[n + 1] - p.batch.cu_seqlens[n];
    const int nch = (len_seq + C - 1) / C;
    int seg_len, segs;
    cp_geometry(nch, p.cp_segments, &seg_len, &segs);
    if (segs < 3) return;
    auto erow = [&](int s) { return p.ws_cp_e + (((i64)n * p.cp_segments + s) * Hv + h) * DK * DV + col0; };
    {
        const float* e0 = erow(0);
        for (int i = tid; i < DK * CP_COLS / 4; i += CP_THREADS) {
            const int r = i / (CP_COLS / 4), c4 = (i % (CP_COLS / 4)) * 4;
            *reinterpret_cast<float4*>(&cur[r][c4]) = *reinterpret_cast<const float4*>(e0 + (i64)r * DV + c4);
        }
    }
    for (int s = 1; s <= segs - 2; ++s) {
        float* es = erow(s);
        const float* as = p.ws_cp_a + (((i64)n * p.cp_segments + s) * Hv + h) * DK * DK;
        float acc[RI][4];
#pragma unroll
        for (int i = 0; i < RI; ++i) {
            const float4 e = *reinterpret_cast<const float4*>(es + (i64)(rg + 32 * i) * DV + 4 * cg);
            acc[i][0] = e.x; acc[i][1] = e.y; acc[i][2] = e.z; acc[i][3] = e.w;
        }
        __syncthreads();  // cur holds E[s-1]
#pragma unroll 2
        for (int k0 = 0; k0 < DK; k0 += 4) {
            float4 b[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = *reinterpret_cast<const float4*>(&cur[k0 + j][4 * cg]);
#pragma unroll
            for (int i = 0; i < RI; ++i) {
                const float4 a = __ldg(reinterpret_cast<const float4*>(as + (i64)(rg + 32 * i) * DK + k0));
                const float av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    acc[i][0] = fmaf(av[j], b[j].x, acc[i][0]);
                    acc[i][1] = fmaf(av[j], b[j].y, acc[i][1]);
                    acc[i][2] = fmaf(av[j], b[j].z, acc[i][2]);
                    acc[i][3] = fmaf(av[j], b[j].w, acc[i][3]);
                }
            }
        }
        __syncthreads();  // every read of cur done
#pragma unroll
        for (int i = 0; i < RI; ++i) {
            const float4 v = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
            *reinterpret_cast<float4*>(&cur[rg + 32 * i][4 * cg]) = v;
            *reinterpret_cast<float4*>(es + (i64)(rg + 32 * i) * DV + 4 * cg) = v;
        }
    }
}

// Dynamic shared memory of scan (mirrored by src/ops/gdn.rs): STAGES operand stages
// (Q, K, W, P, U), the state copy, v_new, diag(fk) v_new, STAGES x F.
template <int DK, int BV, int STAGES>
constexpr int scan_smem_bytes() {
    return STAGES * (3 * C * (DK + PAD) + C * (C + PAD) + C * (BV + PAD)) * 2 + (DK + 2 * C) * (BV + PAD) * 2 + STAGES * 3 * C * 4;
}

} // namespace gdn
} // namespace natsl
