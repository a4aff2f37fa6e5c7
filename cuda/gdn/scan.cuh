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

// Row of a state pool for sequence n (index[n], or n without an index); -1 outside
// [0, rows): h0 then reads a zero state and an output pool is not written (the
// engine's "no initial state" / padding slot), so device indices never address
// memory outside the pool.
// -1 for a padded slot (index -1) and, recorded as a fault, for a row outside the pool.
__device__ __forceinline__ int pool_row(const int* index, int n, int rows, unsigned int* faults) {
    return checked_row(index ? index[n] : n, rows, faults);
}

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
        if (p.h0_pool && pool_row(p.h0_index, n, p.h0_pool_rows, p.faults) >= 0) h0 = p.h0_pool + ((i64)pool_row(p.h0_index, n, p.h0_pool_rows, p.faults) * Hv + h) * DK * DV;
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
    auto write_pool = [&](float* pool, const int* index, int rows) {
        const int row = pool_row(index, n, rows, p.faults);
        if (row < 0) return;  // uniform over the CTA (depends on n only)
        float* dst = pool + ((i64)row * Hv + h) * DK * DV;
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
        if (complete && p.labels) label = read_label(p.labels, (i64)(base + c) * p.num_r_heads + hr, p.faults);
        if (last && !complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index, p.committed_pool_rows);
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

    if (last_complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index, p.committed_pool_rows);
    if (p.running_pool) write_pool(p.running_pool, p.running_index, p.running_pool_rows);
    if (p.gsum_running && vt == 0 && tid == 0) p.gsum_running[(i64)n * Hv + h] = glast_final;
}

// ---------------------------------------------------------------- register-state scan
//
// ScanTile::Reg (tile stages = 3 marks it; two operand stages): the state lives only in
// f32 registers, transposed, in the accumulator layout whose bf16 packing is directly
// the A operand of the next chunk's products, so the per-chunk chain has no state copy
// in smem and no CTA-wide exchange of v_new:
//   warp (cg, ks): value columns vc0 = 16 cg .. +15 of the tile, dk rows 64 ks .. +63;
//   S^T slice 16 x 64 (f32, 32 regs): rows = value columns, cols = dk.
//   aw^T = S^T W^T, ao^T = S^T Q^T  (A = S^T packed from registers, B = W, Q from smem)
//   the two dk halves of a column group (KS = 2 warps) add their partial aw / ao
//   through 6 KB of smem per warp and one 64-thread named barrier (the only sync inside
//   the chain).
//   v_new^T = U^T - aw^T (U^T by ldmatrix.trans: directly the accumulator layout),
//   S'^T = e^{G_L} S^T + (v_new^T diag(fk)) K      (A = v_new^T packed from registers)
//   o^T  = diag(fq)-scaled ao^T + v_new^T P^T       (off the state chain; each dk half
//          finishes 2 of the 4 16-token blocks, balanced against the triangle of P),
//   o stored through movmatrix.trans (16-byte row pieces like the other scans).
// One __syncthreads per chunk (chunk c's operands landed, chunk c - 1's stage free:
// chunk c + 1 is then issued into it and lands under chunk c's math).
// Tile (BV columns, NW warps; KS = NW * 16 / BV = 2 warps per 16 columns, DKW = DK / 2
// = 64 dk rows each): n32w4 at dk 128, the one src/ops/gdn.rs launches. (Tiles whose
// warps held all 128 dk rows (n64w4, n128w8), n64w8 and dk 64's n64w4 were removed: see
// bench/NOTES.md, cleanup.)
// Per warp and chunk, dk = 128: 64 mma (aw, ao) + 32 (state) + 10 (P v_new),
// ~57 ldmatrix, ~500 instructions (the split scan: ~1.3k per warp, 3 CTA barriers, the
// state copy and v_new through smem). The chain from one chunk's operands to the next
// chunk's first mma: 4 k-steps of aw (16 independent accumulators: issue bound,
// ~32 x 8 cycles) + ao (32 mma, same warp) + pair exchange (STS, bar, LDS ~100) +
// v_new packing (~60) + 4 k-steps of the state update (8 accumulators, ~32 x 8) +
// the off-chain o part (~10 mma + stores) + 1 CTA barrier: ~1.2-1.5k cycles per chunk
// at one warp per scheduler (narrow launches, P4 / P9), against ~4.6k measured for
// the split scan's 32-column tile. Then the L2 -> SM operand traffic bounds it (n32:
// ~60 KB per CTA and chunk).
// Context parallelism: same body with the scan_cp geometry (MODE), see scan_cp.
template <int V> struct IntC { static constexpr int value = V; };

__device__ __forceinline__ u32 movmatrix_trans(u32 a) {
    u32 d;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(a));
    return d;
}
__device__ __forceinline__ void bar_named(int id, int count) { asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(count) : "memory"); }

// Async copy of ROWS x COLS elements (compile-time trip count; GUARD: rows >= valid
// zero-filled). Each thread walks one column slot down the rows: one pointer bump per copy.
template <typename T, int ROWS, int COLS, int NT, bool GUARD>
__device__ __forceinline__ void load_tile_async(T* s, int ld, const T* src, i64 stride, int valid) {
    constexpr int VPR = COLS / 8, TOT = ROWS * VPR;
    if constexpr (NT % VPR == 0 && TOT % NT == 0) {
        constexpr int RSTEP = NT / VPR, IT = TOT / NT;
        const int r0 = (int)threadIdx.x / VPR, c = ((int)threadIdx.x % VPR) * 8;
        const T* g = src + (i64)r0 * stride + c;
        T* d = s + r0 * ld + c;
#pragma unroll
        for (int j = 0; j < IT; ++j) {
            const bool ok = !GUARD || r0 + j * RSTEP < valid;
            cp_async16(d + j * RSTEP * ld, ok ? g : src, ok ? 16 : 0);
            g += (i64)RSTEP * stride;
        }
    } else {
        constexpr int IT = (TOT + NT - 1) / NT;
#pragma unroll
        for (int j = 0; j < IT; ++j) {
            const int i = (int)threadIdx.x + j * NT;
            if (i < TOT) {
                const int r = i / VPR, c = (i % VPR) * 8;
                const bool ok = !GUARD || r < valid;
                cp_async16(s + r * ld + c, ok ? src + (i64)r * stride + c : src, ok ? 16 : 0);
            }
        }
    }
}

// Dynamic smem of scan_reg (mirrored by src/ops/gdn.rs reg_scan_smem_bytes): two
// operand stages (Q, K, W, P, U, F) + the dk-half exchange (12 float4 per thread).
template <int DK, int BV, int NW>
constexpr int scan_reg_smem_bytes() {
    return 2 * (3 * C * (DK + PAD) + C * (C + PAD) + C * (BV + PAD) + 6 * C) * 2 + NW * 12 * 32 * 16;
}

template <typename T, int DK, int DV, int BV, int NW, int MODE>
__device__ void scan_reg(const NatslGdnPrefillParams& p) {
    // KS = 2 warps share 16 value columns, each holding DKW = DK / 2 = 64 dk rows.
    constexpr int NCG = BV / 16, KS = NW / NCG, DKW = DK / KS, NJ = DKW / 8, NT = NW * 32;
    static_assert(BV % 16 == 0 && NW % NCG == 0 && KS == 2 && DKW == 64 && DV % BV == 0, "scan_reg tile");
    static_assert(NT >= 3 * C / 4, "scan_reg: F copy needs 48 threads");
    constexpr int LDK = DK + PAD, LDB = BV + PAD, LDP = C + PAD;
    constexpr int ST_Q = 0, ST_K = C * LDK, ST_W = 2 * C * LDK, ST_P = 3 * C * LDK, ST_U = ST_P + C * LDP, ST_F = ST_U + C * LDB;
    constexpr int STAGE = ST_F + 6 * C;  // elements of T (F: 3 x C f32)
    constexpr int NOWN = 4 / KS;         // 16-token output blocks each warp finishes

    extern __shared__ __align__(16) unsigned char smem[];
    T* st0 = reinterpret_cast<T*>(smem);
    float4* xb = reinterpret_cast<float4*>(st0 + 2 * STAGE);  // [NW][12][32]

    const int h = blockIdx.y, n = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
    const int cg = warp / KS, ks = warp % KS;
    const int vc0 = cg * 16, dk0 = ks * DKW;
    const int Hv = p.num_v_heads;
    const int hq = h / (Hv / p.num_qk_heads);
    int bos = p.batch.cu_seqlens[n];
    int len_seq = p.batch.cu_seqlens[n + 1] - bos;
    int nch = (len_seq + C - 1) / C;
    int base = slot_base(p.batch.cu_seqlens, n);
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
    // The segment geometry is re-read from smem at each use (as in scan_cp): the issue
    // path's loop-invariant values otherwise take registers from the state.
    __shared__ int s_geo[4];
    if (tid == 0) {
        s_geo[0] = bos;
        s_geo[1] = len_seq;
        s_geo[2] = base;
        s_geo[3] = nch;
    }
    __syncthreads();
    auto geo = [&](int i) { return *reinterpret_cast<volatile int*>(s_geo + i); };
    const int col0 = vt * BV;
    const i64 cp_row = ((i64)n * p.cp_segments + seg) * Hv + h;
    const T* gq = reinterpret_cast<const T*>(p.q) + (i64)hq * p.q_stride_h;
    const T* gk = reinterpret_cast<const T*>(p.k) + (i64)hq * p.k_stride_h;
    const T* gw = reinterpret_cast<const T*>(p.ws_w);
    const T* gu = reinterpret_cast<const T*>(p.ws_u);
    const T* gp = reinterpret_cast<const T*>(p.ws_p);

    // All operands of chunk cc (one cp.async group) into stage cc & 1.
    // idl, wo: ident, want_o (passed in: constants inside each loop instantiation).
    auto issue = [&](int cc, bool idl, bool wo) {
        if (cc < geo(3)) {
            T* st = st0 + (cc & 1) * STAGE;
            const int tt = geo(0) + cc * C, ln = min(C, geo(1) - cc * C);
            const i64 wrow = (i64)(geo(2) + cc) * Hv + h;
            load_tile_async<T, C, DK, NT, false>(st + ST_W, LDK, gw + wrow * C * DK, DK, C);
            if (!idl) load_tile_async<T, C, BV, NT, false>(st + ST_U, LDB, gu + wrow * C * DV + col0, DV, C);
            if (tid < 3 * C / 4) cp_async16(reinterpret_cast<float*>(st + ST_F) + tid * 4, p.ws_g + wrow * (3 * C) + tid * 4);
            load_tile_async<T, C, DK, NT, true>(st + ST_K, LDK, gk + (i64)tt * p.k_stride_t, p.k_stride_t, ln);
            if (wo) {
                load_tile_async<T, C, DK, NT, true>(st + ST_Q, LDK, gq + (i64)tt * p.q_stride_t, p.q_stride_t, ln);
                load_tile_async<T, C, C, NT, false>(st + ST_P, LDP, gp + wrow * C * C, C, C);
            }
        }
        cp_async_commit();
    };
    issue(0, ident, want_o);

    // S^T slice: SS[j] = rows vc0 + g (+8), dk columns dk0 + 8 j + 2 t4 (+1).
    float SS[NJ][4];
    {
        const float* h0 = nullptr;
        if (seg == 0) {
            if (p.h0_pool && pool_row(p.h0_index, n, p.h0_pool_rows, p.faults) >= 0) h0 = p.h0_pool + ((i64)pool_row(p.h0_index, n, p.h0_pool_rows, p.faults) * Hv + h) * DK * DV;
        } else if (MODE == MODE_CP_C) {
            h0 = p.ws_cp_e + (cp_row - Hv) * DK * DV;
        }
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = col0 + vc0 + g + (e >> 1) * 8, k = dk0 + 8 * j + 2 * t4 + (e & 1);
                SS[j][e] = ident ? (k == r ? 1.f : 0.f) : h0 ? h0[(i64)k * DV + r] : 0.f;
            }
    }
    auto write_state = [&](float* dst, int ld) {
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = col0 + vc0 + g + (e >> 1) * 8, k = dk0 + 8 * j + 2 * t4 + (e & 1);
                dst[(i64)k * ld + r] = SS[j][e];
            }
    };
    auto write_pool = [&](float* pool, const int* index, int rows) {
        const int row = pool_row(index, n, rows, p.faults);
        if (row < 0) return;  // uniform over the CTA (depends on n only)
        write_state(pool + ((i64)row * Hv + h) * DK * DV, DV);
    };

    const int hr = p.labels ? h / (Hv / p.num_r_heads) : 0;
    float glast_final = 0.f;
    bool last_complete = true;
    T* go_seq = reinterpret_cast<T*>(p.o) + (i64)(MODE == MODE_SCAN ? bos : 0) * p.o_stride_t + (i64)h * p.o_stride_h + col0 + vc0;
    // ldmatrix lane offsets.
    const int l_nk_row = (lane & 7) + (lane >> 4) * 8, l_nk_col = ((lane >> 3) & 1) * 8;  // frag_b2_nk
    const int l_kn_row = (lane & 7) + ((lane >> 3) & 1) * 8, l_kn_col = (lane >> 4) * 8;  // frag_b2_kn
    const int l_u_row = ((lane >> 4) & 1) * 8 + (lane & 7), l_u_col = vc0 + ((lane >> 3) & 1) * 8;

    // The chunk loop, instantiated per output mode (pass A's offset / transition tiles
    // write no outputs: their own copy keeps the output path's registers out of it).
    auto run = [&](auto WANT_O) {
    constexpr bool want_o = decltype(WANT_O)::value != 0;
    const bool idl = want_o ? false : ident;  // identity tiles write no outputs
    for (int c = 0; c < geo(3); ++c) {
        const int ln = min(C, geo(1) - c * C);
        const bool complete = ln == C, last = c == geo(3) - 1;
        int label = NATSL_LABEL_GDN;
        if (complete && p.labels) label = read_label(p.labels, (i64)(geo(2) + c) * p.num_r_heads + hr, p.faults);
        cp_async_wait<0>();
        __syncthreads();  // chunk c landed; every warp is done with chunk c - 1's stage
        issue(c + 1, idl, want_o);
        const T* st = st0 + (c & 1) * STAGE;
        const float* sF = reinterpret_cast<const float*>(st + ST_F);
        const float GL = sF[2 * C + C - 1];

        // Phase 1 (partial over this warp's dk rows): aw^T = S^T W^T, ao^T = S^T Q^T.
        float aw[8][4], ao[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) aw[i][e] = ao[i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < NJ / 2; ++kk) {
            u32 a[4];
            a[0] = pack2<T>(SS[2 * kk][0], SS[2 * kk][1]);
            a[1] = pack2<T>(SS[2 * kk][2], SS[2 * kk][3]);
            a[2] = pack2<T>(SS[2 * kk + 1][0], SS[2 * kk + 1][1]);
            a[3] = pack2<T>(SS[2 * kk + 1][2], SS[2 * kk + 1][3]);
            const int kb = (dk0 + kk * 16 + l_nk_col) * 2;
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                u32 b[4];
                ldmatrix_x4(b, reinterpret_cast<const char*>(st + ST_W) + (np * 16 + l_nk_row) * LDK * 2 + kb);
                mma_16816<T>(aw[2 * np], a, b);
                mma_16816<T>(aw[2 * np + 1], a, b + 2);
            }
            if (want_o) {
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    u32 b[4];
                    ldmatrix_x4(b, reinterpret_cast<const char*>(st + ST_Q) + (np * 16 + l_nk_row) * LDK * 2 + kb);
                    mma_16816<T>(ao[2 * np], a, b);
                    mma_16816<T>(ao[2 * np + 1], a, b + 2);
                }
            }
        }

        // The dk halves add their partials: aw in full, ao for the blocks each finishes.
        // Block ownership (16 tokens each): ks 0 -> {0, 3}, ks 1 -> {1, 2} (P's triangle
        // costs 1 + 4 = 2 + 3 k-steps each).
        float oo[2 * NOWN][4];
        int own[NOWN];
        {
            auto xchg = [&](auto KSC) {
                constexpr int kso = decltype(KSC)::value;
                constexpr int o0 = kso == 0 ? 0 : 1, o1 = kso == 0 ? 3 : 2;  // mine
                constexpr int n0 = kso == 0 ? 1 : 0, n1 = kso == 0 ? 2 : 3;  // the partner's, in its order
                float4* mine = xb + warp * 12 * 32 + lane;
                const float4* other = xb + (warp ^ 1) * 12 * 32 + lane;
#pragma unroll
                for (int i = 0; i < 8; ++i) mine[i * 32] = make_float4(aw[i][0], aw[i][1], aw[i][2], aw[i][3]);
                if (want_o) {
                    mine[8 * 32] = make_float4(ao[2 * n0][0], ao[2 * n0][1], ao[2 * n0][2], ao[2 * n0][3]);
                    mine[9 * 32] = make_float4(ao[2 * n0 + 1][0], ao[2 * n0 + 1][1], ao[2 * n0 + 1][2], ao[2 * n0 + 1][3]);
                    mine[10 * 32] = make_float4(ao[2 * n1][0], ao[2 * n1][1], ao[2 * n1][2], ao[2 * n1][3]);
                    mine[11 * 32] = make_float4(ao[2 * n1 + 1][0], ao[2 * n1 + 1][1], ao[2 * n1 + 1][2], ao[2 * n1 + 1][3]);
                }
                bar_named(1 + cg, 64);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float4 x = other[i * 32];
                    aw[i][0] += x.x; aw[i][1] += x.y; aw[i][2] += x.z; aw[i][3] += x.w;
                }
                if (want_o) {
                    constexpr int src[4] = {2 * o0, 2 * o0 + 1, 2 * o1, 2 * o1 + 1};
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const float4 x = other[(8 + i) * 32];
                        oo[i][0] = ao[src[i]][0] + x.x; oo[i][1] = ao[src[i]][1] + x.y;
                        oo[i][2] = ao[src[i]][2] + x.z; oo[i][3] = ao[src[i]][3] + x.w;
                    }
                }
                own[0] = o0;
                own[1] = o1;
            };
            if (ks == 0) xchg(IntC<0>{});
            else xchg(IntC<1>{});
        }

        // v_new^T = U^T - aw^T; A fragments of v_new^T (for P v_new) and v_new^T diag(fk).
        u32 va[4][4], vka[4][4];
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            u32 r[4] = {0u, 0u, 0u, 0u};
            if (!idl) ldmatrix_x4_trans(r, reinterpret_cast<const char*>(st + ST_U) + ((np * 16 + l_u_row) * LDB + l_u_col) * 2);
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int nt = 2 * np + hh;
                const float2 fk = *reinterpret_cast<const float2*>(sF + C + 8 * nt + 2 * t4);
                const float v0 = lo_f32<T>(r[2 * hh]) - aw[nt][0], v1 = hi_f32<T>(r[2 * hh]) - aw[nt][1];
                const float v2 = lo_f32<T>(r[2 * hh + 1]) - aw[nt][2], v3 = hi_f32<T>(r[2 * hh + 1]) - aw[nt][3];
                va[np][2 * hh] = pack2<T>(v0, v1);
                va[np][2 * hh + 1] = pack2<T>(v2, v3);
                vka[np][2 * hh] = pack2<T>(v0 * fk.x, v1 * fk.y);
                vka[np][2 * hh + 1] = pack2<T>(v2 * fk.x, v3 * fk.y);
            }
        }

        // State update with the commit rule: S^T <- e^{G_L} S^T (+ (v_new^T diag(fk)) K for GDN).
        // (Only a sequence's last segment can end in a partial chunk.)
        if (last && !complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index, p.committed_pool_rows);
        const float eg = __expf(GL);
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) SS[j][e] *= eg;
        if (label != NATSL_LABEL_ATTN) {
#pragma unroll
            for (int kb = 0; kb < 4; ++kb)
#pragma unroll
                for (int jp = 0; jp < NJ / 2; ++jp) {
                    u32 b[4];
                    ldmatrix_x4_trans(b, reinterpret_cast<const char*>(st + ST_K) + (kb * 16 + l_kn_row) * LDK * 2 + (dk0 + jp * 16 + l_kn_col) * 2);
                    mma_16816<T>(SS[2 * jp], vka[kb], b);
                    mma_16816<T>(SS[2 * jp + 1], vka[kb], b + 2);
                }
        }

        // Outputs (off the state chain): o^T = diag(fq) ao^T + v_new^T P^T on the owned blocks.
        if (want_o) {
            T* go = go_seq + (i64)((MODE == MODE_SCAN ? 0 : geo(0)) + c * C) * p.o_stride_t;
#pragma unroll
            for (int s = 0; s < NOWN; ++s) {
                const int ip = own[s];
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const float2 fq = *reinterpret_cast<const float2*>(sF + 16 * ip + 8 * hh + 2 * t4);
                    oo[2 * s + hh][0] *= fq.x; oo[2 * s + hh][1] *= fq.y;
                    oo[2 * s + hh][2] *= fq.x; oo[2 * s + hh][3] *= fq.y;
                }
#pragma unroll
                for (int kb = 0; kb < 4; ++kb) {
                    if (kb <= ip) {  // P is lower triangular
                        u32 b[4];
                        ldmatrix_x4(b, reinterpret_cast<const char*>(st + ST_P) + (ip * 16 + l_nk_row) * LDP * 2 + (kb * 16 + l_nk_col) * 2);
                        mma_16816<T>(oo[2 * s], va[kb], b);
                        mma_16816<T>(oo[2 * s + 1], va[kb], b + 2);
                    }
                }
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const float* d = oo[2 * s + hh];
                    const u32 x = movmatrix_trans(pack2<T>(d[0], d[1]));  // value columns 0..7
                    const u32 y = movmatrix_trans(pack2<T>(d[2], d[3]));  // value columns 8..15
                    const int r = 16 * ip + 8 * hh + g;
                    if (r < ln) {
                        *reinterpret_cast<u32*>(go + (i64)r * p.o_stride_t + 2 * t4) = x;
                        *reinterpret_cast<u32*>(go + (i64)r * p.o_stride_t + 8 + 2 * t4) = y;
                    }
                }
            }
        }
        if (last) {
            last_complete = complete;
            glast_final = complete ? 0.f : GL;
        }
    }
    };
    if (MODE == MODE_CP_A && !want_o) run(IntC<0>{});
    else run(IntC<1>{});
    cp_async_wait<0>();

    if (final_seg) {
        if (last_complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index, p.committed_pool_rows);
        if (p.running_pool) write_pool(p.running_pool, p.running_index, p.running_pool_rows);
        if (p.gsum_running && vt == 0 && tid == 0) p.gsum_running[(i64)n * Hv + h] = glast_final;
    } else if (MODE == MODE_CP_A) {
        if (ident) write_state(p.ws_cp_a + cp_row * DK * DK, DK);
        else write_state(p.ws_cp_e + cp_row * DK * DV, DV);
    }
}

// Entry `scan`: the split-prefetch scan (one stage, the shipped tiles); tile stages = 3:
// scan_reg (ScanTile::Reg). (A two-stage scan_staged and a 128-column tile measured
// slower in run f and were removed.)
template <typename T, int DK, int DV, int BV, int NW, int STAGES>
__device__ void scan(const NatslGdnPrefillParams& p) {
    if constexpr (STAGES == 3) scan_reg<T, DK, DV, BV, NW, MODE_SCAN>(p);
    else scan_split<T, DK, DV, BV, NW, STAGES>(p);
}

// The context-parallel passes (MODE_CP_A / MODE_CP_C): the scan above with segment
// geometry, zero / identity / E start states and the segment-end writes (a copy, so
// the plain scan's code stays exactly as validated).
template <typename T, int DK, int DV, int BV, int NW, int STAGES, int MODE>
__device__ void scan_cp_split(const NatslGdnPrefillParams& p) {
    constexpr int NT = NW * 32;
    constexpr int LDK = DK + PAD, LDB = BV + PAD, LDP = C + PAD;
    constexpr int ST_Q = 0, ST_K = C * LDK, ST_W = 2 * C * LDK, ST_P = 3 * C * LDK, ST_U = ST_P + C * LDP;
    constexpr int STAGE = ST_U + C * LDB;  // elements of T in the operand stage
    // Token phase: warps as 4 (16-row tiles) x NG (column groups of the BV tile).
    constexpr int NG = NW / 4, NTV = BV / NG / 8;
    // State phase: warp w owns state rows [w * RW, (w + 1) * RW), all BV columns.
    constexpr int RW = DK / NW, MTS = RW / 16, NTS = BV / 8;
    static_assert(NW % 4 == 0 && BV % (NG * 16) == 0 && RW % 16 == 0 && DV % BV == 0, "bad scan tile");
    static_assert(STAGES == 1, "scan_cp: one operand stage with split prefetch");
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
            if (p.h0_pool && pool_row(p.h0_index, n, p.h0_pool_rows, p.faults) >= 0) h0 = p.h0_pool + ((i64)pool_row(p.h0_index, n, p.h0_pool_rows, p.faults) * Hv + h) * DK * DV;
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
    auto write_pool = [&](float* pool, const int* index, int rows) {
        const int row = pool_row(index, n, rows, p.faults);
        if (row < 0) return;  // uniform over the CTA (depends on n only)
        write_state(pool + ((i64)row * Hv + h) * DK * DV, DV);
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
        if (complete && p.labels) label = read_label(p.labels, (i64)(geo(2, base) + c) * p.num_r_heads + hr, p.faults);
        if (last && !complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index, p.committed_pool_rows);
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
        if (last_complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index, p.committed_pool_rows);
        if (p.running_pool) write_pool(p.running_pool, p.running_index, p.running_pool_rows);
        if (p.gsum_running && vt == 0 && tid == 0) p.gsum_running[(i64)n * Hv + h] = glast_final;
    } else if (MODE == MODE_CP_A) {
        // Segment end (every chunk complete): transition A[seg] columns or offset / state E[seg].
        if (ident) write_state(p.ws_cp_a + cp_row * DK * DK, DK);
        else write_state(p.ws_cp_e + cp_row * DK * DV, DV);
    }
}

// Entries scan_cp_a / scan_cp_c: scan_reg for the register-state tile (stages = 3).
template <typename T, int DK, int DV, int BV, int NW, int STAGES, int MODE>
__device__ void scan_cp(const NatslGdnPrefillParams& p) {
    if constexpr (STAGES == 3) scan_reg<T, DK, DV, BV, NW, MODE>(p);
    else scan_cp_split<T, DK, DV, BV, NW, STAGES, MODE>(p);
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
