// gdn/fused.cuh: the fused, warp-specialised sm_90a GDN chunk prefill (src/ops/gdn.rs
// ScanTile::Fused / FusedInline). Two variants of one kernel template (SPLIT):
//   split (entries fused_split, fused_split_cp_a, fused_split_cp_c; the default): the
//        state-independent chunk products Tb = T diag(beta), P and the row factors come
//        from the records that fused_prep (prep_grouped<..., FUSED_WS = true>, fully
//        parallel) wrote, 17 KB per (slot, value head); one thread of WG0 bulk-copies
//        them with chunk c's q, k, v (TMA) into 3-deep rings, so the per-chunk chain is
//        the consumers' (the inline prep's ~10.8k cycles bound the inline variant).
//   inline (entries fused, fused_cp_a, fused_cp_c): WG0 computes them on chip one chunk
//        ahead, as described below. Kept only until one device run compares the two.
// Both: the same math and rounding points as prep_grouped + scan_reg (see
// gdn/prefill.cuh): raw q, k with the L2 norms folded into f32 factors, T by
// prep_grouped's blocked split-bf16 inverse, bf16 T diag(beta), P, v_new.
//
// CTA = (128 state columns, value head, sequence); context parallelism: the scan_cp
// segment grid with 128-column tiles. dk = 128, dv a multiple of 128. 384 threads:
//   WG0  prep, one chunk ahead of the consumers, into a 2-deep ring of stages; its thread
//        0 also issues the TMA loads through the tensor maps in the params: Q and K (the
//        q/k head's 64 x dk tiles, 128B-swizzled 64-column panels) into a 3-deep ring, V
//        (the CTA's 64 x 128 tile) into a 2-deep ring. Per chunk:
//          gates (cumsum, in log2 units), 1 / |q|, 1 / |k| from the shared tiles,
//          Q K^T, K K^T (wgmma m64n64, both operands in shared memory),
//          P = scale (Q K^T / (|q_i| |k_j|)) e^{G_i - G_j} (j <= i), bf16,
//          A = strictly_lower(beta_i e^{G_i - G_j} k_i.k_j / (|k_i| |k_j|)) (f32, smem),
//          T = (I + A)^{-1} (level-0 substitution, split-bf16 mma merges: prep_grouped),
//          Tb = T diag(beta) (bf16; zero for context-parallel identity tiles: U = 0),
//          W = T diag(beta e^G / |k|) K (wgmma, T from registers, K MN-major),
//          fq = scale e^G / |q|, fk = e^{G_L - G} / |k|, G_L and the chunk's label.
//   WG1, WG2  consumers, 64 state columns each. The state lives transposed in wgmma
//        accumulators, S^T (64 columns x dk, f32, 64 registers), so its bf16 packing is
//        directly the A operand of the products that read it (no smem copy):
//          D   = -V^T Tb^T + S^T W^T          = -v_new^T   (V^T: A MN-major from smem)
//          O   = S^T Q^T                      = (Q S)^T
//          S^T = e^{G_L} S^T + (v_new^T diag(fk)) K        (A = v_new^T from registers;
//                ATTN chunk: A = 0, so the update is a pure decay and no wgmma is conditional)
//          O   = diag(fq) O + v_new^T P^T, stored through movmatrix.trans.
//        Per chunk two commit groups and two waits: (D, O) then (S^T, O += ...).
//
// mbarriers: qkfull / vfull (1 arrival + TMA bytes), pfull (128: every prep thread, after
// fence.proxy.async of its generic writes), pempty (256: every consumer thread, after its
// last wgmma of the chunk was waited on). Chunk c uses Q/K slot c % 3 (parity (c / 3) & 1),
// V slot and prep stage c % 2 (parity (c / 2) & 1). Once the consumers released chunk
// c - 2 (pempty), the prep writes stage c % 2 and thread 0 loads chunk c + 1's Q/K and
// chunk c's V (those slots last held chunk c - 2): Q/K land while chunk c is prepared, V
// while the consumers finish chunk c - 1.
//
// Rows past a sequence's end in its last partial chunk hold the next sequence's tokens
// (or TMA zeros past the tensor): beta = g = 0 there, so those rows of A, T diag(beta),
// W and hence v_new are exact zeros and nothing of them reaches a stored output (inputs
// are finite; validation does not scan data).
#pragma once
#include "common/sm90.cuh"
#include "common/wgmma.cuh"
#include "gdn/prep.cuh"
#include "gdn/scan.cuh"

namespace natsl {
namespace gdn {

#if NATSL_SM90A

// Shared-memory map (bytes from the 1024-aligned base); mirrored by
// src/ops/gdn.rs fused_smem_bytes. SPLIT (entries fused_split*): the prep stage is the
// fused_prep record as bulk-copied (Tb | P | F), no inverse scratch, and with the prep
// reduced to TMA issue every ring is 3 deep (one index c % 3 for all of them).
template <bool SPLIT>
struct FusedLayoutT {
    static constexpr int PANEL = 64 * 128;          // one [64][64] sw128 panel
    static constexpr int QKS = 3, VS = SPLIT ? 3 : 2, PS = SPLIT ? 3 : 2;  // ring depths
    static constexpr int QK_STAGE = 4 * PANEL;      // Q (2 panels) | K (2 panels), dk = 128
    static constexpr int V_STAGE = 2 * PANEL;       // the CTA's 128 value columns
    // Prep stage: (inline prep: 2 panels, unused since the consumers form W S) |
    // Tb [64][64] | P [64][64] | F (fq[64], fk[64], G_L, label, fe[64]).
    static constexpr int P_TB = SPLIT ? 0 : 2 * PANEL, P_P = P_TB + PANEL, P_F = P_P + PANEL;
    static constexpr int P_STAGE = P_F + 1024;
    static constexpr int QK = 0;
    static constexpr int V = QK + QKS * QK_STAGE;
    static constexpr int PR = V + VS * V_STAGE;
    static constexpr int LDA = C + 4;               // f32 inverse scratch [64][68] (inline prep only)
    static constexpr int SA = PR + PS * P_STAGE;
    static constexpr int SM = SA + (SPLIT ? 0 : C * LDA * 4);   // 2 x [invq | invk | G log2 | beta | beta e^G]
    static constexpr int BAR = SM + (SPLIT ? 0 : 2 * 5 * C * 4);
    static constexpr int NBAR = QKS + VS + 2 * PS;
    static constexpr int BYTES = BAR + NBAR * 8 + 1024;  // + alignment slack
    static_assert(!SPLIT || (P_STAGE == FREC_BYTES && P_TB == FREC_TB && P_P == FREC_P && P_F == FREC_F), "split stage = fused_prep record");
    static_assert(PR % 1024 == 0 && P_STAGE % 1024 == 0, "wgmma panels 1024-aligned");
};
using FusedLayout = FusedLayoutT<false>;

// Registers after setmaxnreg: 128 * (120 + 2 * 192) = 64512, the CTA's allocation at
// launch (384 threads at the 168 of __launch_bounds__(384, 1)). Below 192 the consumers'
// wgmma are serialised for want of registers (ptxas C7512); the prep spills below ~112.
constexpr int kFusedPrepRegs = 120;
constexpr int kFusedConsumerRegs = 192;
// Split: the prep warpgroup only issues copies (one thread), so the consumers take the rest.
constexpr int kSplitPrepRegs = 40;
constexpr int kSplitConsumerRegs = 232;
static_assert(kSplitPrepRegs + 2 * kSplitConsumerRegs == kFusedPrepRegs + 2 * kFusedConsumerRegs, "64512 registers");
constexpr int kFusedPrepBar = 1;  // named barrier of the prep warpgroup (128 threads)

// Phase timer (NATSL_GDN_FUSED_PROFILE: profile units only, tile stages odd, never shipped):
// clock64 at phase boundaries, by thread 0 of each warpgroup, for the CTAs (0, h < 4, 0) and
// chunks < 64, into natsl_gdn_fused_prof[cta][chunk][32] (slots 0..15 prep, 16 + 8 cw + e
// consumer warpgroup cw), then per CTA (start clock, start globaltimer, end clock, end
// globaltimer). src/bench/gdn.rs fused_profile reads it back and prints the table.
#if NATSL_GDN_FUSED_PROFILE
constexpr int kProfCtas = 4, kProfChunks = 64, kProfEv = 32;
extern "C" {
__device__ unsigned long long natsl_gdn_fused_prof[kProfCtas * kProfChunks * kProfEv + kProfCtas * 4];
}
__device__ __forceinline__ bool fused_prof_cta() { return blockIdx.x == 0 && blockIdx.z == 0 && blockIdx.y < kProfCtas; }
__device__ __forceinline__ unsigned long long fused_clock() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(t) :: "memory");
    return t;
}
__device__ __forceinline__ void fused_prof(int c, int slot) {
    if (!fused_prof_cta() || c >= kProfChunks || (threadIdx.x & 127) != 0) return;
    natsl_gdn_fused_prof[((int)blockIdx.y * kProfChunks + c) * kProfEv + slot] = fused_clock();
}
__device__ __forceinline__ void fused_prof_edge(int end) {
    if (!fused_prof_cta()) return;
    unsigned long long gt;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(gt) :: "memory");
    unsigned long long* h = natsl_gdn_fused_prof + kProfCtas * kProfChunks * kProfEv + (int)blockIdx.y * 4 + 2 * end;
    h[0] = fused_clock();
    h[1] = gt;
}
#define NATSL_FUSED_PROF(c, slot) fused_prof(c, slot)
#define NATSL_FUSED_PROF_EDGE(end) fused_prof_edge(end)
#else
#define NATSL_FUSED_PROF(c, slot) ((void)0)
#define NATSL_FUSED_PROF_EDGE(end) ((void)0)
#endif


// Keep A fragments unmodified until the wgmma reading them was waited on.
template <int NK>
__device__ __forceinline__ void fused_hold_a(u32 (*a)[4]) {
#pragma unroll
    for (int i = 0; i < NK; ++i) asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3]) :: "memory");
}

// The CTA's work: a (segment of a) sequence, value head, 128-column tile.
struct FusedWork {
    int n, h, hq, vt, seg, bos, len_seq, nch, base, col0, col0v;
    bool ident, want_o, final_seg;
    i64 cp_row;
};

// scan_reg's geometry with 128-column tiles (false: nothing to do, uniform over the CTA).
template <int MODE, int DK, int DV>
__device__ __forceinline__ bool fused_work(const NatslGdnPrefillParams& p, FusedWork& w) {
    w.h = blockIdx.y;
    w.n = blockIdx.z;
    const int Hv = p.num_v_heads;
    w.hq = w.h / (Hv / p.num_qk_heads);
    w.bos = p.batch.cu_seqlens[w.n];
    w.len_seq = p.batch.cu_seqlens[w.n + 1] - w.bos;
    w.nch = (w.len_seq + C - 1) / C;
    w.base = slot_base(p.batch.cu_seqlens, w.n);
    w.vt = blockIdx.x;
    w.seg = 0;
    w.ident = false;
    w.want_o = true;
    w.final_seg = true;
    if (MODE != MODE_SCAN) {
        constexpr int TV = DV / 128, TK = DK / 128;
        int seg_len, segs;
        cp_geometry(w.nch, p.cp_segments, &seg_len, &segs);
        if (MODE == MODE_CP_A) {
            w.seg = blockIdx.x / (TK + TV);
            const int t = blockIdx.x % (TK + TV);
            w.ident = t < TK;
            if (w.seg >= segs || (w.seg > 0 && w.seg == segs - 1) || (w.seg == 0 && w.ident)) return false;
            w.vt = w.ident ? t : t - TK;
            w.want_o = w.seg == 0;
        } else {
            w.seg = 1 + blockIdx.x / TV;
            w.vt = blockIdx.x % TV;
            if (w.seg >= segs) return false;
        }
        const int c_begin = w.seg * seg_len, c_end = min(w.nch, c_begin + seg_len);
        w.final_seg = c_end == w.nch;
        w.bos += c_begin * C;
        w.len_seq = min(w.len_seq - c_begin * C, (c_end - c_begin) * C);
        w.base += c_begin;
        w.nch = c_end - c_begin;
    }
    w.col0 = w.vt * 128;               // state columns (dk columns for identity tiles)
    w.col0v = w.ident ? 0 : w.col0;    // V columns loaded (identity tiles: any tile, times Tb = 0)
    w.cp_row = ((i64)w.n * p.cp_segments + w.seg) * Hv + w.h;
    return true;
}

// SPLIT: the state-independent chunk products (Tb, P, F) come from fused_prep's records
// through the stage ring; otherwise the prep warpgroup computes them (inline prep).
template <typename T, int DK, int DV, int MODE, bool SPLIT>
__device__ void gdn_fused(const NatslGdnFusedParams& fp) {
    static_assert(DK == 128 && DV % 128 == 0, "fused prefill: dk 128, dv a multiple of 128");
    using L = FusedLayoutT<SPLIT>;
    constexpr int PANEL = L::PANEL, LDA = L::LDA;
    const NatslGdnPrefillParams& p = fp.base;
    extern __shared__ __align__(128) unsigned char smem_raw[];  // aligned to 1024 below
    const u32 raw_addr = smem_u32(smem_raw);
    unsigned char* smem = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
    const u32 sbase = smem_u32(smem);
    const u32 bar0 = sbase + L::BAR;
    auto qkfull = [&](int s) { return bar0 + 8 * s; };
    auto vfull = [&](int s) { return bar0 + 8 * (L::QKS + s); };
    auto pfull = [&](int s) { return bar0 + 8 * (L::QKS + L::VS + s); };
    auto pempty = [&](int s) { return bar0 + 8 * (L::QKS + L::VS + L::PS + s); };

    // Both roles re-read the (segment's) bos, length, chunk count, slot base, V columns and
    // identity flag from shared memory at each use (as scan_reg does): kept in registers
    // across the chunk loops they would take registers from the accumulators.
    __shared__ int s_geo[6];
    {
        FusedWork w0;
        if (!fused_work<MODE, DK, DV>(p, w0)) return;  // uniform over the CTA: before any barrier
        if (threadIdx.x == 0) {
            s_geo[0] = w0.bos;
            s_geo[1] = w0.len_seq;
            s_geo[2] = w0.nch;
            s_geo[3] = w0.base;
            s_geo[4] = w0.col0v;
            s_geo[5] = w0.ident;
        }
    }
    auto geo = [&](int i) { return *reinterpret_cast<volatile int*>(s_geo + i); };

    const int tid = threadIdx.x;
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < L::QKS; ++s) mbar_init(qkfull(s), 1);
#pragma unroll
        for (int s = 0; s < L::VS; ++s) mbar_init(vfull(s), 1);
#pragma unroll
        for (int s = 0; s < L::PS; ++s) {
            mbar_init(pfull(s), SPLIT ? 1 : 128);
            mbar_init(pempty(s), 256);
        }
        mbar_init_fence();
        NATSL_FUSED_PROF_EDGE(0);
    }
    __syncthreads();

    const int wg = tid >> 7;
    const int lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const int Hv = p.num_v_heads;
    if (wg == 0) {
        // ------------------------------------------------------------ prep (+ TMA issue)
        reg_dealloc<SPLIT ? kSplitPrepRegs : kFusedPrepRegs>();
        const int h = blockIdx.y, hq = h / (Hv / p.num_qk_heads);
        // Thread 0 issues the TMA loads: Q/K of chunk cc into slot cc % QKS, V into cc % VS.
        auto issue_qk = [&](int cc) {
            const int s = cc % L::QKS;
            const u32 qa = sbase + L::QK + s * L::QK_STAGE;
            mbar_arrive_expect_tx(qkfull(s), 2 * C * DK * 2);
#pragma unroll
            for (int pn = 0; pn < DK / 64; ++pn) {
                tma_load_3d(qa + pn * PANEL, &fp.tma_q, qkfull(s), pn * 64, hq, geo(0) + cc * C);
                tma_load_3d(qa + (DK / 64 + pn) * PANEL, &fp.tma_k, qkfull(s), pn * 64, hq, geo(0) + cc * C);
            }
        };
        auto issue_v = [&](int cc) {
            const int s = cc % L::VS;
            const u32 va = sbase + L::V + s * L::V_STAGE;
            mbar_arrive_expect_tx(vfull(s), C * 128 * 2);
#pragma unroll
            for (int pn = 0; pn < 2; ++pn) tma_load_3d(va + pn * PANEL, &fp.tma_v, vfull(s), geo(4) + pn * 64, h, geo(0) + cc * C);
        };
        if constexpr (SPLIT) {
            // Identity tiles: V never loaded, every slot zero (vfull: a plain arrive).
            if (geo(5) != 0) {
                for (int i = threadIdx.x; i < L::VS * L::V_STAGE / 16; i += 128) *reinterpret_cast<uint4*>(smem + L::V + 16 * i) = make_uint4(0u, 0u, 0u, 0u);
                fence_proxy_async();
                named_bar_sync(kFusedPrepBar, 128);
            }
            if (tid != 0) return;
            tma_prefetch_desc(&fp.tma_q);
            tma_prefetch_desc(&fp.tma_k);
            tma_prefetch_desc(&fp.tma_v);
            // Record of chunk c: slot geo(3) + c, value head h.
            const unsigned char* rec = reinterpret_cast<const unsigned char*>(p.ws_fused) + ((i64)geo(3) * Hv + h) * FREC_BYTES;
#pragma unroll 1
            for (int c = 0; c < geo(2); ++c) {
                // One ring index: chunk c's Q/K, V and record slots last held chunk c - 3.
                const int s = c % L::PS;
                NATSL_FUSED_PROF(c, 0);
                if (c >= L::PS) mbar_wait(pempty(s), ((c / L::PS) & 1) ^ 1);
                NATSL_FUSED_PROF(c, 1);
                issue_qk(c);
                if (geo(5) != 0) mbar_arrive(vfull(s));
                else issue_v(c);
                mbar_arrive_expect_tx(pfull(s), FREC_BYTES);
                bulk_load(sbase + L::PR + s * L::P_STAGE, rec + (i64)c * Hv * FREC_BYTES, FREC_BYTES, pfull(s));
                NATSL_FUSED_PROF(c, 14);
            }
            return;
        } else {
            if (tid == 0 && geo(2) > 0) {
                tma_prefetch_desc(&fp.tma_q);
                tma_prefetch_desc(&fp.tma_k);
                tma_prefetch_desc(&fp.tma_v);
                issue_qk(0);
            }
            float* sA = reinterpret_cast<float*>(smem + L::SA);
            const int hr = p.labels ? h / (Hv / p.num_r_heads) : 0;
            float gn[2], bn[2];  // raw gates of the next chunk (lane: tokens 2 lane, 2 lane + 1)
            // Identity tiles: V never loaded, both slots zero (vfull: a plain arrive).
            if (geo(5) != 0) {
                for (int i = threadIdx.x; i < L::VS * L::V_STAGE / 16; i += 128) *reinterpret_cast<uint4*>(smem + L::V + 16 * i) = make_uint4(0u, 0u, 0u, 0u);
                fence_proxy_async();
                named_bar_sync(kFusedPrepBar, 128);
            }
            if (geo(2) > 0) prep_load_gates<T>(p, geo(0), min(C, geo(1)), h, gn, bn);
#pragma unroll 1
            for (int c = 0; c < geo(2); ++c) {
                // Thread indices read afresh (see prep_fresh_tid): the swizzled smem offsets
                // derived from them are recomputed per chunk, not hoisted and kept live (spills).
                NATSL_FUSED_PROF(c, 0);
                const int pt = prep_fresh_tid(), pw = pt >> 5, m0 = pw * 16;
                const int lane = pt & 31, g = lane >> 2, tq = lane & 3;
                const int ln = min(C, geo(1) - c * C);
                const int sq = c % L::QKS, sp = c % L::PS;
                float* sm = reinterpret_cast<float*>(smem + L::SM) + (c & 1) * 5 * C;
                float* sInvQ = sm;
                float* sInvK = sm + C;
                float* sG2 = sm + 2 * C;  // cumulative gate, log2 units
                float* sB = sm + 3 * C;   // beta
                float* sE = sm + 4 * C;   // beta e^G
                // The chunk's label (read early: used at the end).
                int label = NATSL_LABEL_GDN;
                if (pt == 0 && ln == C && p.labels) label = read_label(p.labels, (i64)(geo(3) + c) * p.num_r_heads + hr, p.faults);
                // Gates of chunk c: every warp scans them itself; the next chunk's are loaded now.
                float gx[2] = {gn[0], gn[1]};
                const float bx[2] = {bn[0], bn[1]};
                if (c + 1 < geo(2)) prep_load_gates<T>(p, geo(0) + (c + 1) * C, min(C, geo(1) - (c + 1) * C), h, gn, bn);
                prep_warp_cumsum(gx[0], gx[1]);
                const float gl = __shfl_sync(0xffffffffu, gx[1], 31);
                if (pw == 0) {
                    *reinterpret_cast<float2*>(sG2 + 2 * lane) = make_float2(gx[0] * PREP_LOG2E, gx[1] * PREP_LOG2E);
                    *reinterpret_cast<float2*>(sB + 2 * lane) = make_float2(bx[0], bx[1]);
                    *reinterpret_cast<float2*>(sE + 2 * lane) = make_float2(bx[0] * __expf(gx[0]), bx[1] * __expf(gx[1]));
                }
                // Consumers done with chunk c - 2: this chunk's prep stage, the Q/K slot of chunk
                // c + 1 and the V slot of chunk c are free (each last held chunk c - 2).
                if (c >= L::PS) mbar_wait(pempty(sp), ((c / L::PS) & 1) ^ 1);
                NATSL_FUSED_PROF(c, 1);
                if (pt == 0) {
                    if (c + 1 < geo(2)) issue_qk(c + 1);
                    if (geo(5) != 0) mbar_arrive(vfull(c % L::VS));
                    else issue_v(c);
                }
                mbar_wait(qkfull(sq), (c / L::QKS) & 1);
                NATSL_FUSED_PROF(c, 2);
                const unsigned char* sQ = smem + L::QK + sq * L::QK_STAGE;
                const unsigned char* sK = sQ + (DK / 64) * PANEL;
                const unsigned long long qd = wg_desc(smem_u32(sQ)), kd = wg_desc(smem_u32(sK));
                // Q K^T, issued before the norms so that it runs under them (then K K^T: one
                // 64 x 64 accumulator at a time keeps the prep within its registers).
                float qk[8][4];
#pragma unroll
                for (int i = 0; i < 8; ++i)
#pragma unroll
                    for (int e = 0; e < 4; ++e) qk[i][e] = 0.f;
                wg_hold<8>(qk);
                wg_fence();
#pragma unroll
                for (int ks = 0; ks < DK / 16; ++ks) {
                    const u32 off = (ks >> 2) * PANEL + (ks & 3) * 32;
                    wgmma_ss<T, 64, 0>(qk, wg_desc_add(qd, off), wg_desc_add(kd, off), ks > 0);
                }
                wg_commit();
                // 1 / |q| (threads 0..63: row pt) and 1 / |k| (64..127: row pt - 64).
                {
                    const int row = pt & (C - 1);
                    const unsigned char* rb = (pt < C ? sQ : sK) + row * 128;
                    float ss[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                    for (int pn = 0; pn < DK / 64; ++pn)
#pragma unroll
                        for (int ch = 0; ch < 8; ++ch) {
                            float x[8];
                            const vec8 v = *reinterpret_cast<const vec8*>(rb + pn * PANEL + ((ch ^ (row & 7)) << 4));
                            unpack8<T>(v, x);
#pragma unroll
                            for (int e = 0; e < 8; ++e) ss[e % 4] = fmaf(x[e], x[e], ss[e % 4]);
                        }
                    const float inv = p.l2norm ? rsqrtf(((ss[0] + ss[1]) + (ss[2] + ss[3])) + 1e-6f) : 1.f;
                    (pt < C ? sInvQ : sInvK)[row] = inv;
                }
                named_bar_sync(kFusedPrepBar, 128);  // norms and gates visible
                NATSL_FUSED_PROF(c, 3);
                wg_wait<0>();
                wg_hold<8>(qk);
                NATSL_FUSED_PROF(c, 4);
                unsigned char* st = smem + L::PR + sp * L::P_STAGE;
                const float gi0 = sG2[m0 + g], gi1 = sG2[m0 + g + 8];
                // P (every tile: the consumers read all of it; zero above the diagonal).
                {
                    const float r0 = p.scale * sInvQ[m0 + g], r1 = p.scale * sInvQ[m0 + g + 8];
                    unsigned char* sP = st + L::P_P;
#pragma unroll
                    for (int nt = 0; nt < 8; ++nt) {
                        const int j = nt * 8 + tq * 2;
                        u32 wv[2] = {0u, 0u};
                        if (nt / 2 <= pw) {
                            const float2 ck = *reinterpret_cast<const float2*>(sInvK + j);
                            const float2 gj = *reinterpret_cast<const float2*>(sG2 + j);
#pragma unroll
                            for (int hf = 0; hf < 2; ++hf) {
                                const int i = m0 + g + hf * 8;
                                const float gi = hf ? gi1 : gi0, r = hf ? r1 : r0;
                                const float d0 = j <= i ? fast_exp2(gi - gj.x) : 0.f;
                                const float d1 = j + 1 <= i ? fast_exp2(gi - gj.y) : 0.f;
                                wv[hf] = pack2<T>(qk[nt][hf * 2] * (r * ck.x) * d0, qk[nt][hf * 2 + 1] * (r * ck.y) * d1);
                            }
                        }
#pragma unroll
                        for (int hf = 0; hf < 2; ++hf) *reinterpret_cast<u32*>(sP + 2 * sw128<64>(m0 + g + hf * 8, j)) = wv[hf];
                    }
                }
                NATSL_FUSED_PROF(c, 5);
                // K K^T, then A = strictly_lower(beta_i e^{G_i - G_j} k_i.k_j / (|k_i| |k_j|)) into sA.
                {
                    float kk[8][4];
#pragma unroll
                    for (int i = 0; i < 8; ++i)
#pragma unroll
                        for (int e = 0; e < 4; ++e) kk[i][e] = 0.f;
                    wg_hold<8>(kk);
                    wg_fence();
#pragma unroll
                    for (int ks = 0; ks < DK / 16; ++ks) {
                        const unsigned long long dkk = wg_desc_add(kd, (ks >> 2) * PANEL + (ks & 3) * 32);
                        wgmma_ss<T, 64, 0>(kk, dkk, dkk, ks > 0);
                    }
                    wg_commit();
                    wg_wait<0>();
                    wg_hold<8>(kk);
                    NATSL_FUSED_PROF(c, 6);
                    const float ri0 = sB[m0 + g] * sInvK[m0 + g], ri1 = sB[m0 + g + 8] * sInvK[m0 + g + 8];
#pragma unroll
                    for (int nt = 0; nt < 8; ++nt) {
                        if (nt / 2 > pw) continue;  // A is never read above the diagonal blocks
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
                named_bar_sync(kFusedPrepBar, 128);
                NATSL_FUSED_PROF(c, 7);
                // Level 0: thread pt < 64 solves column m of the inverse of diagonal block pt / 16.
                {
                    const int m = pt % 16, o = (pt / 16) * 16;
                    float t[16];
                    if (pt < C) {
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
                    named_bar_sync(kFusedPrepBar, 128);  // the diagonal blocks of A are read
                    if (pt < C) {
#pragma unroll
                        for (int i = 0; i < 16; ++i) sA[(o + i) * LDA + o + m] = t[i];
                    }
                }
                named_bar_sync(kFusedPrepBar, 128);  // diagonal inverses D0..D3 in sA
                NATSL_FUSED_PROF(c, 8);
                if (pw < 2) {
                    // Level 1: T[o+16.., o..] = -(D_hi A[o+16.., o..]) D_lo, o = 32 pw.
                    const int o = pw * 32;
                    float y[2][4];
                    strip_lmr<2, 2, LDA>(y, sA, 1, o + 16, o + 16, o + 16, o, 0, o, o);
                    __syncwarp();  // all lanes have read A[o+16.., o..]
#pragma unroll
                    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                        for (int hf = 0; hf < 2; ++hf) {
                            const int r = o + 16 + g + hf * 8, cc = o + nt * 8 + tq * 2;
                            *reinterpret_cast<float2*>(sA + r * LDA + cc) = make_float2(y[nt][hf * 2], y[nt][hf * 2 + 1]);
                        }
                }
                named_bar_sync(kFusedPrepBar, 128);  // T[0:32, 0:32] and T[32:64, 32:64] complete
                NATSL_FUSED_PROF(c, 9);
                {
                    // Level 2: T[32:64, 0:32] = -(T[32:64, 32:64] A[32:64, 0:32]) T[0:32, 0:32].
                    const int s = pw & 1, hc = pw >> 1;
                    float y[2][4];
                    strip_lmr<4, 2, LDA>(y, sA, s + 1, 32 + 16 * s, 32, 32, 0, hc, 0, 16 * hc);
                    named_bar_sync(kFusedPrepBar, 128);
#pragma unroll
                    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                        for (int hf = 0; hf < 2; ++hf) {
                            const int r = 32 + 16 * s + g + hf * 8, cc = 16 * hc + nt * 8 + tq * 2;
                            *reinterpret_cast<float2*>(sA + r * LDA + cc) = make_float2(y[nt][hf * 2], y[nt][hf * 2 + 1]);
                        }
                }
                named_bar_sync(kFusedPrepBar, 128);  // T complete (f32, lower block triangle)
                NATSL_FUSED_PROF(c, 10);

                // This warp's 16 rows of Tb = T diag(beta) to the stage (the consumers form
                // both U = Tb V and W S = (S K^T diag(e^G / |k|)) Tb: the prep computes no W).
                {
                    unsigned char* sTB = st + L::P_TB;
#pragma unroll
                    for (int kb = 0; kb < 4; ++kb) {
                        u32 tb[4] = {0u, 0u, 0u, 0u};
                        const int c0 = 16 * kb + 2 * tq;
                        if (kb <= pw) {
                            const float* p0 = sA + (m0 + g) * LDA + c0;
                            const float* p1 = p0 + 8 * LDA;
                            const float2 x0 = *reinterpret_cast<const float2*>(p0), x1 = *reinterpret_cast<const float2*>(p1);
                            const float2 x2 = *reinterpret_cast<const float2*>(p0 + 8), x3 = *reinterpret_cast<const float2*>(p1 + 8);
                            const float2 bl = *reinterpret_cast<const float2*>(sB + c0), bh = *reinterpret_cast<const float2*>(sB + c0 + 8);
                            tb[0] = pack2<T>(x0.x * bl.x, x0.y * bl.y);
                            tb[1] = pack2<T>(x1.x * bl.x, x1.y * bl.y);
                            tb[2] = pack2<T>(x2.x * bh.x, x2.y * bh.y);
                            tb[3] = pack2<T>(x3.x * bh.x, x3.y * bh.y);
                        }
                        *reinterpret_cast<u32*>(sTB + 2 * sw128<64>(m0 + g, c0)) = tb[0];
                        *reinterpret_cast<u32*>(sTB + 2 * sw128<64>(m0 + g + 8, c0)) = tb[1];
                        *reinterpret_cast<u32*>(sTB + 2 * sw128<64>(m0 + g, c0 + 8)) = tb[2];
                        *reinterpret_cast<u32*>(sTB + 2 * sw128<64>(m0 + g + 8, c0 + 8)) = tb[3];
                    }
                }
                NATSL_FUSED_PROF(c, 11);
                // Row factors (warp 0: tokens 2 lane, 2 lane + 1), G_L and the label.
                if (pw == 0) {
                    float* F = reinterpret_cast<float*>(st + L::P_F);
                    const float2 iq = *reinterpret_cast<const float2*>(sInvQ + 2 * lane);
                    const float2 ik = *reinterpret_cast<const float2*>(sInvK + 2 * lane);
                    *reinterpret_cast<float2*>(F + 2 * lane) = make_float2(p.scale * __expf(gx[0]) * iq.x, p.scale * __expf(gx[1]) * iq.y);
                    *reinterpret_cast<float2*>(F + C + 2 * lane) = make_float2(__expf(gl - gx[0]) * ik.x, __expf(gl - gx[1]) * ik.y);
                    // fe = e^G / |k|: the column factors of the consumers' S^T K^T.
                    *reinterpret_cast<float2*>(F + 3 * C + 2 * lane) = make_float2(__expf(gx[0]) * ik.x, __expf(gx[1]) * ik.y);
                    if (lane == 0) {
                        F[2 * C] = gl;
                        F[2 * C + 1] = __int_as_float(label);
                    }
                }
                (void)ln;
                fence_proxy_async();  // generic writes of P, Tb before the consumers' wgmma reads
                mbar_arrive(pfull(sp));
                NATSL_FUSED_PROF(c, 14);
            }
            return;
        }
    }

    // ---------------------------------------------------------------- consumers
    reg_alloc<SPLIT ? kSplitConsumerRegs : kFusedConsumerRegs>();
    FusedWork w;
    fused_work<MODE, DK, DV>(p, w);
    const int cw = wg - 1;  // 64 state columns: col0 + 64 cw ..
    const int ct = tid & 127, cwarp = ct >> 5;
    const int colw = w.col0 + 64 * cw;
    // S^T: S[nt][e] = state (dk row 8 nt + 2 tq + (e & 1), column colw + 16 cwarp + g + 8 (e >> 1)).
    float S[16][4];
    {
        const float* h0 = nullptr;
        if (w.seg == 0) {
            if (p.h0_pool && pool_row(p.h0_index, w.n, p.h0_pool_rows, p.faults) >= 0) h0 = p.h0_pool + ((i64)pool_row(p.h0_index, w.n, p.h0_pool_rows, p.faults) * Hv + w.h) * DK * DV;
        } else if (MODE == MODE_CP_C) {
            h0 = p.ws_cp_e + (w.cp_row - Hv) * DK * DV;
        }
#pragma unroll
        for (int nt = 0; nt < 16; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = colw + 16 * cwarp + g + (e >> 1) * 8, k = 8 * nt + 2 * tq + (e & 1);
                S[nt][e] = w.ident ? (k == r ? 1.f : 0.f) : h0 ? h0[(i64)k * DV + r] : 0.f;
            }
    }
    auto write_state = [&](float* dst, int ld) {
#pragma unroll
        for (int nt = 0; nt < 16; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = colw + 16 * cwarp + g + (e >> 1) * 8, k = 8 * nt + 2 * tq + (e & 1);
                dst[(i64)k * ld + r] = S[nt][e];
            }
    };
    // (n, h from the block index: nothing of the geometry but colw and want_o is kept
    // live across the chunk loop; it is recomputed after it.)
    auto write_pool = [&](float* pool, const int* index, int rows) {
        const int row = pool_row(index, (int)blockIdx.z, rows, p.faults);
        if (row < 0) return;  // uniform over the CTA (depends on n only)
        write_state(pool + ((i64)row * Hv + (int)blockIdx.y) * DK * DV, DV);
    };
    const bool want_o = w.want_o;
#pragma unroll 1
    for (int c = 0; c < geo(2); ++c) {
        NATSL_FUSED_PROF(c, 16 + 8 * cw);
        const int lane = prep_fresh_tid() & 31, g = lane >> 2, tq = lane & 3;  // afresh, as in the prep
        const int ln = min(C, geo(1) - c * C);
        const bool complete = ln == C, last = c == geo(2) - 1;
        const int sq = c % L::QKS, sv = c % L::VS, sp = c % L::PS;
        const u32 qa = sbase + L::QK + sq * L::QK_STAGE, ka = qa + (DK / 64) * PANEL;
        const u32 vta = sbase + L::V + sv * L::V_STAGE + cw * PANEL;
        const u32 pa = sbase + L::PR + sp * L::P_STAGE;
        const unsigned long long qad = wg_desc(qa), kad = wg_desc(ka), vtad = wg_desc(vta), tbd = wg_desc(pa + L::P_TB);
        const float* F = reinterpret_cast<const float*>(smem + L::PR + sp * L::P_STAGE + L::P_F);
        mbar_wait(pfull(sp), (c / L::PS) & 1);
        NATSL_FUSED_PROF(c, 17 + 8 * cw);
        mbar_wait(qkfull(sq), (c / L::QKS) & 1);
        mbar_wait(vfull(sv), (c / L::VS) & 1);
        NATSL_FUSED_PROF(c, 18 + 8 * cw);
        const float GL = F[2 * C];
        const bool attn = __float_as_int(F[2 * C + 1]) == NATSL_LABEL_ATTN;

        // The old state's bf16 packing: the A operand of S^T W^T and S^T Q^T.
        u32 sa[8][4];
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            sa[kk][0] = pack2<T>(S[2 * kk][0], S[2 * kk][1]);
            sa[kk][1] = pack2<T>(S[2 * kk][2], S[2 * kk][3]);
            sa[kk][2] = pack2<T>(S[2 * kk + 1][0], S[2 * kk + 1][1]);
            sa[kk][3] = pack2<T>(S[2 * kk + 1][2], S[2 * kk + 1][3]);
        }
        float vn[8][4], oq[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) vn[i][e] = oq[i][e] = 0.f;
        wg_hold<8>(vn);
        wg_hold<8>(oq);
        fused_hold_a<8>(sa);
        wg_fence();
        // Group 1: Y = S^T K^T (into vn; K-major from the Q/K stage).
#pragma unroll
        for (int kk = 0; kk < DK / 16; ++kk) wgmma_rs<T, 64, 0>(vn, sa[kk], wg_desc_add(kad, (kk >> 2) * PANEL + (kk & 3) * 32), kk > 0);
        wg_commit();
        // Group 2: (Q S)^T. Both groups are waited for here, so the old state's packing
        // dies before v_new is formed (headroom: below ~200 registers ptxas serialises
        // every wgmma, C7512).
#pragma unroll
        for (int kk = 0; kk < DK / 16; ++kk) wgmma_rs<T, 64, 0>(oq, sa[kk], wg_desc_add(qad, (kk >> 2) * PANEL + (kk & 3) * 32), kk > 0);
        wg_commit();
        wg_wait<0>();
        wg_hold<8>(vn);
        wg_hold<8>(oq);
        fused_hold_a<8>(sa);
        // X = Y diag(e^G / |k|) as A fragments; -v_new^T = -V^T Tb^T + X Tb^T.
        u32 xa[4][4];
#pragma unroll
        for (int kb = 0; kb < 4; ++kb)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int nt = 2 * kb + hh;
                const float2 fe = *reinterpret_cast<const float2*>(F + 3 * C + 8 * nt + 2 * tq);
                xa[kb][2 * hh] = pack2<T>(vn[nt][0] * fe.x, vn[nt][1] * fe.y);
                xa[kb][2 * hh + 1] = pack2<T>(vn[nt][2] * fe.x, vn[nt][3] * fe.y);
            }
        wg_hold<8>(vn);
        wg_hold<8>(oq);
        fused_hold_a<4>(xa);
        wg_fence();
#pragma unroll
        for (int kb = 0; kb < 4; ++kb) wgmma_ss_ta<T, 64, 0, -1>(vn, wg_desc_add(vtad, kb * 16 * 128), wg_desc_add(tbd, kb * 32), kb > 0);
#pragma unroll
        for (int kb = 0; kb < 4; ++kb) wgmma_rs<T, 64, 0>(vn, xa[kb], wg_desc_add(tbd, kb * 32), 1);
        wg_commit();
        wg_wait<0>();
        wg_hold<8>(vn);
        wg_hold<8>(oq);
        fused_hold_a<4>(xa);
        NATSL_FUSED_PROF(c, 19 + 8 * cw);

        // v_new^T as A fragments (for P v_new), and v_new^T diag(fk) (zero for an ATTN chunk).
        u32 va[4][4], vka[4][4];
        const float gate = attn ? 0.f : 1.f;
#pragma unroll
        for (int kb = 0; kb < 4; ++kb)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int nt = 2 * kb + hh;
                const float2 fk = *reinterpret_cast<const float2*>(F + C + 8 * nt + 2 * tq);
                const float k0 = fk.x * gate, k1 = fk.y * gate;
                const float v0 = -vn[nt][0], v1 = -vn[nt][1], v2 = -vn[nt][2], v3 = -vn[nt][3];
                va[kb][2 * hh] = pack2<T>(v0, v1);
                va[kb][2 * hh + 1] = pack2<T>(v2, v3);
                vka[kb][2 * hh] = pack2<T>(v0 * k0, v1 * k1);
                vka[kb][2 * hh + 1] = pack2<T>(v2 * k0, v3 * k1);
            }
        // o^T = diag(fq) (Q S)^T (+ v_new^T P^T below).
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            const float2 fq = *reinterpret_cast<const float2*>(F + 8 * nt + 2 * tq);
            oq[nt][0] *= fq.x;
            oq[nt][1] *= fq.y;
            oq[nt][2] *= fq.x;
            oq[nt][3] *= fq.y;
        }
        // A partial last chunk: the committed state is the state at its start.
        if (last && !complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index, p.committed_pool_rows);
        // Group 3: S^T <- e^{G_L} S^T + (v_new^T diag(fk)) K, then o^T += v_new^T P^T.
        const float eg = __expf(GL);
#pragma unroll
        for (int nt = 0; nt < 16; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) S[nt][e] *= eg;
        wg_hold<16>(S);
        wg_hold<8>(oq);
        fused_hold_a<4>(vka);
        fused_hold_a<4>(va);
        NATSL_FUSED_PROF(c, 20 + 8 * cw);
        wg_fence();
#pragma unroll
        for (int kb = 0; kb < 4; ++kb) wgmma_rs<T, 128, 1>(S, vka[kb], wg_desc_add(wg_desc(ka, PANEL), kb * 16 * 128), 1);
#pragma unroll
        for (int kb = 0; kb < 4; ++kb) wgmma_rs<T, 64, 0>(oq, va[kb], wg_desc_add(wg_desc(pa + L::P_P), kb * 32), 1);
        wg_commit();
        wg_wait<0>();
        wg_hold<16>(S);
        wg_hold<8>(oq);
        fused_hold_a<4>(va);
        fused_hold_a<4>(vka);
        mbar_arrive(pempty(sp));  // Q/K, V and the prep stage of chunk c are read
        NATSL_FUSED_PROF(c, 21 + 8 * cw);

        if (want_o) {
            // o rows = tokens: movmatrix.trans turns each 8 x 8 block (value columns x tokens)
            // into (tokens x value columns); 4-byte stores, 16 bytes per row and quad.
            T* go = reinterpret_cast<T*>(p.o) + (i64)(geo(0) + c * C) * p.o_stride_t + (i64)blockIdx.y * p.o_stride_h + colw + 16 * ((prep_fresh_tid() & 127) >> 5);
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                const u32 x = movmatrix_trans(pack2<T>(oq[nt][0], oq[nt][1]));  // value columns 0..7
                const u32 y = movmatrix_trans(pack2<T>(oq[nt][2], oq[nt][3]));  // value columns 8..15
                const int r = 8 * nt + g;
                if (r < ln) {
                    *reinterpret_cast<u32*>(go + (i64)r * p.o_stride_t + 2 * tq) = x;
                    *reinterpret_cast<u32*>(go + (i64)r * p.o_stride_t + 8 + 2 * tq) = y;
                }
            }
        }
        NATSL_FUSED_PROF(c, 22 + 8 * cw);
    }
    if (cw == 0 && ct == 0) NATSL_FUSED_PROF_EDGE(1);

    // The end of the (segment of the) sequence: whether its last chunk is complete, and
    // its G_L (still in the last prep stage: the prep writes no stage after it).
    const int nch_end = geo(2);
    const bool last_complete = nch_end == 0 || geo(1) == nch_end * C;
    const float glast_final = last_complete ? 0.f : reinterpret_cast<const float*>(smem + L::PR + ((nch_end - 1) % L::PS) * L::P_STAGE + L::P_F)[2 * C];
    fused_work<MODE, DK, DV>(p, w);
    if (w.final_seg) {
        if (last_complete && p.committed_pool) write_pool(p.committed_pool, p.committed_index, p.committed_pool_rows);
        if (p.running_pool) write_pool(p.running_pool, p.running_index, p.running_pool_rows);
        if (p.gsum_running && w.vt == 0 && cw == 0 && ct == 0) p.gsum_running[(i64)w.n * Hv + w.h] = glast_final;
    } else if (MODE == MODE_CP_A) {
        if (w.ident) write_state(p.ws_cp_a + w.cp_row * DK * DK, DK);
        else write_state(p.ws_cp_e + w.cp_row * DK * DV, DV);
    }
}

#endif  // NATSL_SM90A

} // namespace gdn
} // namespace natsl
