// gdn/fused.cuh: the fused, warp-specialised sm_90a GDN chunk prefill (src/ops/gdn.rs
// ScanTile::Fused; entries fused_split, fused_split_cp_a, fused_split_cp_c). The
// state-independent chunk products Tb = T diag(beta), P and the row factors come from the
// records that fused_prep (prep_grouped<..., FUSED_WS = true>, fully parallel over (slot,
// q/k head)) wrote, 17 KB per (slot, value head), with the same math and rounding points as
// prep_grouped + scan_reg (see gdn/prefill.cuh): raw q, k with the L2 norms folded into f32
// factors, T by prep_grouped's blocked split-bf16 inverse, bf16 T diag(beta), P, v_new.
// (An inline variant whose prep warpgroup computed them on chip, one chunk ahead, was
// removed after H200 run o: its ~10.8k-cycle prep chain bound it; bench/NOTES.md.)
//
// CTA = (128 state columns, value head, sequence); context parallelism: the scan_cp
// segment grid with 128-column tiles. dk = 128, dv a multiple of 128. 384 threads:
//   WG0  thread 0 issues, once the consumers released chunk c - 3 (pempty), chunk c's TMA
//        loads through the tensor maps in the params (Q and K: the q/k head's 64 x dk
//        tiles, 128B-swizzled 64-column panels; V: the CTA's 64 x 128 tile) and one bulk
//        copy of its record, into 3-deep rings of all three (one ring index c % 3). The
//        rest of WG0 only zeroes V for identity tiles, then exits.
//   WG1, WG2  consumers, 64 state columns each. The state lives transposed in wgmma
//        accumulators, S^T (64 columns x dk, f32, 64 registers), so its bf16 packing is
//        directly the A operand of the products that read it (no smem copy):
//          Y   = S^T K^T,  X = Y diag(fe)     (fe = e^G / |k|: W S = (S^T K^T diag(fe)) Tb^T)
//          D   = -V^T Tb^T + X Tb^T           = -v_new^T   (V^T: A MN-major from smem)
//          O   = S^T Q^T                      = (Q S)^T
//          S^T = e^{G_L} S^T + (v_new^T diag(fk)) K        (A = v_new^T from registers;
//                ATTN chunk: A = 0, so the update is a pure decay and no wgmma is conditional)
//          O   = diag(fq) O + v_new^T P^T, stored through movmatrix.trans.
//
// mbarriers: qkfull / vfull / pfull (1 arrival + TMA / bulk-copy bytes; vfull of an identity
// tile a plain arrive), pempty (256: every consumer thread, after its last wgmma of the
// chunk was waited on). Chunk c uses slot c % 3 of every ring (parity (c / 3) & 1).
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
// src/ops/gdn.rs fused_split_smem_bytes. The record stage is the fused_prep record as
// bulk-copied (Tb | P | F); every ring is 3 deep (one index c % 3 for all of them).
struct FusedLayout {
    static constexpr int PANEL = 64 * 128;          // one [64][64] sw128 panel
    static constexpr int QKS = 3, VS = 3, PS = 3;   // ring depths
    static constexpr int QK_STAGE = 4 * PANEL;      // Q (2 panels) | K (2 panels), dk = 128
    static constexpr int V_STAGE = 2 * PANEL;       // the CTA's 128 value columns
    // Record stage: Tb [64][64] | P [64][64] | F (fq[64], fk[64], G_L, label, fe[64]).
    static constexpr int P_TB = 0, P_P = P_TB + PANEL, P_F = P_P + PANEL;
    static constexpr int P_STAGE = P_F + 1024;
    static constexpr int QK = 0;
    static constexpr int V = QK + QKS * QK_STAGE;
    static constexpr int PR = V + VS * V_STAGE;
    static constexpr int BAR = PR + PS * P_STAGE;
    static constexpr int NBAR = QKS + VS + 2 * PS;
    static constexpr int BYTES = BAR + NBAR * 8 + 1024;  // + alignment slack
    static_assert(P_STAGE == FREC_BYTES && P_TB == FREC_TB && P_P == FREC_P && P_F == FREC_F, "stage = fused_prep record");
    static_assert(PR % 1024 == 0 && P_STAGE % 1024 == 0, "wgmma panels 1024-aligned");
};

// Registers after setmaxnreg: 128 * (40 + 2 * 232) = 64512, the CTA's allocation at launch
// (384 threads at the 168 of __launch_bounds__(384, 1)). WG0 only issues copies (one
// thread), so the consumers take the rest (below 192 ptxas serialises their wgmma, C7512).
constexpr int kFusedPrepRegs = 40;
constexpr int kFusedConsumerRegs = 232;
static_assert(128 * (kFusedPrepRegs + 2 * kFusedConsumerRegs) == 64512, "64512 registers");
constexpr int kFusedPrepBar = 1;  // named barrier of WG0 (128 threads)

// Phase timer (NATSL_GDN_FUSED_PROFILE: profile units only, tile stages odd, never shipped):
// clock64 at phase boundaries, by thread 0 of each warpgroup, for the CTAs (0, h < 4, 0) and
// chunks < 64, into natsl_gdn_fused_prof[cta][chunk][32] (slots 0..15 WG0: 0, 1 and 14
// stamped; 16 + 8 cw + e consumer warpgroup cw), then per CTA (start clock, start globaltimer, end clock, end
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

// The state-independent chunk products (Tb, P, F) come from fused_prep's records through
// the stage ring.
template <typename T, int DK, int DV, int MODE>
__device__ void gdn_fused(const NatslGdnFusedParams& fp) {
    static_assert(DK == 128 && DV % 128 == 0, "fused prefill: dk 128, dv a multiple of 128");
    using L = FusedLayout;
    constexpr int PANEL = L::PANEL;
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
            mbar_init(pfull(s), 1);
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
        // ------------------------------------------------------------ TMA / record issue
        reg_dealloc<kFusedPrepRegs>();
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
    }

    // ---------------------------------------------------------------- consumers
    reg_alloc<kFusedConsumerRegs>();
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
        const int lane = prep_fresh_tid() & 31, g = lane >> 2, tq = lane & 3;  // afresh (prep_fresh_tid)
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
        mbar_arrive(pempty(sp));  // Q/K, V and the record stage of chunk c are read
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
    // its G_L (still in the last record stage: no copy lands after it).
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
