// prefill_ws.cuh: warp-specialized block-sparse flash softmax prefill on sm_90a
// (entries prefill_ws: PrefillKernel::WarpSpecialized, no flags; prefill_ws_pingpong:
// PrefillKernel::WarpSpecializedPingPong, PIPE + PP + WIDE below), FlashAttention-3
// structure, loads by cp.async (no TMA tensor maps: no new params). Run g (H200) timed
// each flag alone too (entries since removed): PIPE, PP, PIPE + PP each within 2% of
// no flags; PIPE + PP + WIDE 3-4% faster.
//
// CTA = 128 query rows = two consecutive 64-row chunks c0 = 2i, c1 = 2i + 1 of one
// (sequence, query head); 384 threads = 3 warpgroups:
//   WG0       producer: cp.async loads (zero fill past the sequence end) of Q (both
//             chunks) and of a ring of STAGES (K, V) 64-key slots; completion is
//             signalled through mbarriers (cp.async.mbarrier.arrive.noinc), so no
//             thread waits on its own copies. setmaxnreg down to 56.
//   WG1, WG2  consumers (setmaxnreg up to 224): consumer w (0, 1) owns chunk c_w.
//             Per visible block: S = Q K^T (wgmma; Q from registers for d <= 128,
//             from smem for d 256), mask / online softmax in registers, O += P V
//             (wgmma RS, P from registers), as prefill_wgmma.cuh. Consumer 1 starts
//             one QK^T behind consumer 0 (named barrier 3, once), so the two run out
//             of phase: one's softmax under the other's tensor-core work.
//             PIPE: each consumer also issues block i's QK^T with block i-1's PV and
//             does its softmax under the PV; the held stage is released when that PV
//             completes.
// Both chunks share every K/V byte the producer loads (the list entries < c0 and
// block c0), which halves K/V traffic against one CTA per chunk.
//
// Visit sequence of the pair (ROUTED mode only; BLOCKS mode goes to prefill_wgmma on
// the host), mirroring PrefillWork::block_at per chunk:
//   A: list entries [0, len0)            WG0 if 0 <= b < c0, WG1 if pos < len1, 0 <= b < c1
//   B: block c0                          WG0 (causal diagonal), WG1 iff list[len0] == c0
//   C: list entries [startC, len1)       WG1 if 0 <= b < c1 (empty for a sorted list)
//   D: block c1                          WG1 (causal diagonal), only if c1 exists
// Positions no consumer wants are not loaded. Each loaded stage is released by both
// consumers (every consumer warp arrives on its empty barrier, used or not).
//
// mbarriers: full[s] (count 128: the producer threads' noinc arrivals), empty[s]
// (count 8: one arrival per consumer warp), qfull (count 128). Stage k (k-th loaded
// position) uses slot k % STAGES with phase parity (k / STAGES) & 1.
//
// Grid order: GQA q heads of one kv head fastest, then chunk pairs (heaviest, i.e.
// latest, first), then kv heads, then sequences: CTAs running together share one
// (sequence, kv head) and its K/V stays in L2.
#pragma once
#include "sparse/prefill_wgmma.cuh"

namespace natsl {
namespace sparse {
#if NATSL_SM90A
// Arrive on `bar` when every cp.async this thread issued so far has completed.
__device__ __forceinline__ void ws_cp_async_mbar_arrive(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(bar) : "memory");
}
#endif
}
}

namespace natsl {
namespace sparse {

#if NATSL_SM90A

// Named barrier ids: 1, 2 = consumer warpgroup 0, 1 (128 threads); 3 = the one-time
// offset of consumer 1 behind consumer 0 (256 threads); 4, 5 = the ping-pong turns of
// consumer 0, 1 (PP: 256 threads, bar.sync by the owner, bar.arrive by the other).
constexpr int kWsPPOffsetBar = 3;
constexpr int kWsPPTurnBar = 4;

// Keep P fragments alive and unmodified until the PV wgmma reading them was waited on.
__device__ __forceinline__ void wspp_hold_a(u32 (*a)[4]) {
    asm volatile("" : "+r"(a[0][0]), "+r"(a[0][1]), "+r"(a[0][2]), "+r"(a[0][3]),
        "+r"(a[1][0]), "+r"(a[1][1]), "+r"(a[1][2]), "+r"(a[1][3]),
        "+r"(a[2][0]), "+r"(a[2][1]), "+r"(a[2][2]), "+r"(a[2][3]),
        "+r"(a[3][0]), "+r"(a[3][1]), "+r"(a[3][2]), "+r"(a[3][3]) :: "memory");
}

constexpr int kWsPPProducerRegs = 56;
constexpr int kWsPPConsumerRegs = 224;  // 128 * 56 + 256 * 224 = 64512 <= 65536

template <int DK, int DV>
struct WsPPCfg {
    static constexpr int STAGES = DK + DV > 256 ? 2 : 3;
    static constexpr int DQ = DK > DV ? DK : DV;                // a Q tile doubles as the O staging tile
    static constexpr int QBYTES = 64 * DQ * 2;
    static constexpr int Q = 0;                                  // 2 x [64][DQ] (Q sw128 [64][DK], then O)
    static constexpr int K = Q + 2 * QBYTES;                     // STAGES x [64][DK] sw128
    static constexpr int V = K + STAGES * 64 * DK * 2;           // STAGES x [64][DV] sw128
    static constexpr int KSCALE = V + STAGES * 64 * DV * 2;      // [2 consumers][2 parities][64] f32
    static constexpr int BAR = KSCALE + 2 * 2 * 64 * 4;          // full[STAGES], empty[STAGES], qfull
    static constexpr int BYTES = BAR + (2 * STAGES + 1) * 8 + 1024;  // + alignment slack
};

// The CTA's pair of chunks and the visit sequence (see the file comment).
struct WsPPWork {
    int j, n, c0, seq0, len, kvh;
    bool has1;           // chunk c1 = c0 + 1 exists
    int q_rows0, q_rows1;
    const int* list;
    int len0, len1, startC, nC, npos;
    bool c0_listed;      // WG1 sees block c0 (list[len0] == c0)

    __device__ __forceinline__ bool init(const NatslSparsePrefillParams& p) {
        const int Hq = p.num_q_heads, Hkv = p.num_kv_heads;
        const int G = Hq / Hkv;
        const int P = (p.batch.max_chunks + 1) >> 1;
        int lin = blockIdx.x;
        const int g = lin % G;
        lin /= G;
        const int pair = P - 1 - lin % P;
        lin /= P;
        kvh = lin % Hkv;
        n = lin / Hkv;
        j = kvh * G + g;
        if (n >= p.batch.num_seqs) return false;
        c0 = 2 * pair;
        seq0 = p.batch.cu_seqlens[n];
        len = p.batch.cu_seqlens[n + 1] - seq0;
        if (c0 * 64 >= len) return false;
        has1 = (c0 + 1) * 64 < len;
        q_rows0 = min(64, len - c0 * 64);
        q_rows1 = has1 ? min(64, len - (c0 + 1) * 64) : 0;
        const int mh = j / (Hq / p.num_mask_heads);
        list = p.attn_list + (i64)mh * p.batch.num_slots + slot_base(p.batch.cu_seqlens, n);
        const int cnt = max(p.attn_count[n * p.num_mask_heads + mh], 0);
        len0 = lower_bound_i32(list, min(cnt, c0), c0);
        len1 = has1 ? lower_bound_i32(list, min(cnt, c0 + 1), c0 + 1) : 0;
        c0_listed = has1 && len1 > len0 && list[len0] == c0;
        startC = len0 + (c0_listed ? 1 : 0);
        nC = has1 ? max(len1 - startC, 0) : 0;
        npos = len0 + 1 + nC + (has1 ? 1 : 0);
        return true;
    }
    // Block at visit position `pos` and which consumers use it (bit w: consumer w; 0: skip).
    __device__ __forceinline__ int item(int pos, int* b) const {
        if (pos < len0) {
            const int x = list[pos];
            *b = x;
            const int m0 = (x >= 0 && x < c0) ? 1 : 0;
            const int m1 = (has1 && pos < len1 && x >= 0 && x < c0 + 1) ? 2 : 0;
            return m0 | m1;
        }
        pos -= len0;
        if (pos == 0) {
            *b = c0;
            return 1 | (c0_listed ? 2 : 0);
        }
        pos -= 1;
        if (pos < nC) {
            const int x = list[startC + pos];
            *b = x;
            return (x >= 0 && x < c0 + 1) ? 2 : 0;
        }
        *b = c0 + 1;
        return 2;
    }
};

// Epilogue of one consumer warpgroup (128 threads, `wtid` its thread index, named
// barrier `bar`): store_prefill_output for the warpgroup's chunk `c`.
template <typename T, int DV>
__device__ __forceinline__ void wspp_store_output(const NatslSparsePrefillParams& p, const WsPPWork& w, int c, int q_rows, float (&o)[DV / 8][4],
                                                float (&l)[2], const float (&m)[2], T* so, int row_a, int wtid, int bar) {
    const int lane = wtid & 31;
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
    const i64 t0 = w.seq0 + (i64)c * 64;
    if (p.lse && (lane & 3) == 0) {
        if (row_a < q_rows) p.lse[(t0 + row_a) * p.lse_stride_t + w.j] = l[0] > 0.f ? (m[0] + __log2f(l[0])) * kLn2 : neg_inf();
        if (row_a + 8 < q_rows) p.lse[(t0 + row_a + 8) * p.lse_stride_t + w.j] = l[1] > 0.f ? (m[1] + __log2f(l[1])) * kLn2 : neg_inf();
    }
    named_bar_sync(bar, 128);
    T* og = reinterpret_cast<T*>(p.o) + t0 * p.o_stride_t + (i64)w.j * p.o_stride_h;
    constexpr int CPR = DV / 8;
#pragma unroll
    for (int i = wtid; i < 64 * CPR; i += 128) {
        const int r = i / CPR, col = (i % CPR) * 8;
        if (r < q_rows) *reinterpret_cast<vec8*>(og + (i64)r * p.o_stride_t + col) = *reinterpret_cast<const vec8*>(so + swz<DV>(r, col));
    }
}

// PP: FA3 ping-pong. The two consumers take turns
// at issuing their wgmmas, one turn per loaded stage, consumer 0 first: consumer w
// waits for its turn (bar.sync kWsPPTurnBar + w) before issuing the stage's QK^T (PIPE:
// with the held block's PV) and hands the turn over (bar.arrive on the other's) right
// after, so one consumer's softmax runs under the other's tensor-core work on every
// stage, not only at the start (the one-time offset of the non-PP entries drifts into
// lock-step). Both consumers walk the same loaded stages (used or not: an unused stage
// is a turn taken and handed over at once), so the turns always pair up: consumer 1
// arrives once up front, and consumer 0 consumes consumer 1's last hand-over after
// the loop; nothing is left pending on either barrier at exit.
//
// WIDE (with PIPE and PP): O += P V as m64n128k16 wgmmas (one per
// 16 keys and 128 columns of V, B spanning two 64-column panels through the
// descriptor's leading byte offset) instead of m64n64k16 per panel: half the PV
// wgmmas and half the A-fragment register reads per MAC. dv = 64 keeps m64n64.
template <typename T, int DK, int DV, bool PIPE, bool PP = false, bool WIDE = false>
__device__ void sparse_prefill_ws_pingpong(const NatslSparsePrefillParams& p) {
    static_assert(DK % 64 == 0 && DV % 64 == 0 && DK <= 256 && DV <= 256, "head dims");
    using S = WsPPCfg<DK, DV>;
    constexpr int ST = S::STAGES;
    constexpr int PANEL = 64 * 64 * 2;  // bytes of one 64-column panel of a 64-row tile
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 raw_addr = smem_u32(smem_raw);
    unsigned char* smem = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
    const u32 sbase = smem_u32(smem);
    const u32 full_bar = sbase + S::BAR;             // full[s] at + 8 s
    const u32 empty_bar = full_bar + ST * 8;         // empty[s] at + 8 s
    const u32 q_bar = full_bar + 2 * ST * 8;

    WsPPWork w;
    if (!w.init(p)) return;  // uniform over the CTA: before any barrier

    const int tid = threadIdx.x;
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < ST; ++s) {
            mbar_init(full_bar + 8 * s, 128);
            mbar_init(empty_bar + 8 * s, 8);
        }
        mbar_init(q_bar, 128);
        // The inits visible to the asynchronous arrivals (cp.async completion) too.
        mbar_init_fence();
    }
    __syncthreads();

    const int wg = tid >> 7;  // 0 producer, 1 / 2 consumers
    if (wg == 0) {
        // ------------------------------------------------------------ producer
        reg_dealloc<kWsPPProducerRegs>();
        const int ptid = tid;
        const T* qg = reinterpret_cast<const T*>(p.q) + (i64)(w.seq0 + w.c0 * 64) * p.q_stride_t + (i64)w.j * p.q_stride_h;
        load_tile_sw128<T, DK, 64, 128>(reinterpret_cast<T*>(smem + S::Q), qg, p.q_stride_t, w.q_rows0, ptid);
        if (w.has1)
            load_tile_sw128<T, DK, 64, 128>(reinterpret_cast<T*>(smem + S::Q + S::QBYTES), qg + 64 * p.q_stride_t, p.q_stride_t, w.q_rows1, ptid);
        ws_cp_async_mbar_arrive(q_bar);
        const T* kg = reinterpret_cast<const T*>(p.k) + (i64)w.seq0 * p.k_stride_t + (i64)w.kvh * p.k_stride_h;
        const T* vg = reinterpret_cast<const T*>(p.v) + (i64)w.seq0 * p.v_stride_t + (i64)w.kvh * p.v_stride_h;
        int k = 0;
#pragma unroll 1
        for (int pos = 0; pos < w.npos; ++pos) {
            int b;
            if (!w.item(pos, &b)) continue;
            const int slot = k % ST;
            if (k >= ST) mbar_wait(empty_bar + 8 * slot, ((k / ST) + 1) & 1);  // use k - ST released
            T* sk = reinterpret_cast<T*>(smem + S::K + slot * 64 * DK * 2);
            T* sv = reinterpret_cast<T*>(smem + S::V + slot * 64 * DV * 2);
            load_tile_sw128<T, DK, 64, 128>(sk, kg + (i64)b * 64 * p.k_stride_t, p.k_stride_t, w.len - b * 64, ptid);
            load_tile_sw128<T, DV, 64, 128>(sv, vg + (i64)b * 64 * p.v_stride_t, p.v_stride_t, w.len - b * 64, ptid);
            ws_cp_async_mbar_arrive(full_bar + 8 * slot);
            ++k;
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");  // nothing in flight when the thread exits
        return;
    }

    // ---------------------------------------------------------------- consumers
    reg_alloc<kWsPPConsumerRegs>();
    const int cw = wg - 1;              // consumer index = chunk c0 + cw
    const int wtid = tid & 127, warp = wtid >> 5, lane = tid & 31;
    const int bar = 1 + cw;             // named barrier of this warpgroup
    const int c = w.c0 + cw;
    const bool active = cw == 0 || w.has1;
    const int q_rows = cw == 0 ? w.q_rows0 : w.q_rows1;
    const u32 q_addr = sbase + S::Q + cw * S::QBYTES;
    T* sq = reinterpret_cast<T*>(smem + S::Q + cw * S::QBYTES);
    const T* wq = reinterpret_cast<const T*>(p.q_norm_w);
    const T* wk = reinterpret_cast<const T*>(p.k_norm_w);

    if (active) {
        mbar_wait(q_bar, 0);
        fence_proxy_async();
        if (wq || wk) {
            fold_q_norm_sw128<T, DK, 64, 128>(sq, wq, wk, p.norm_eps, wtid);
            fence_proxy_async();  // generic writes of Q before the wgmma reads
            named_bar_sync(bar, 128);
        }
    }

    // d <= 128: Q K^T takes Q from registers (A fragments of the warp's 16 rows), so
    // the QK wgmma reads only K from shared memory (SS m64n64 would read 4 KB per
    // 32 tensor-core cycles, the whole smem bandwidth). d 256 keeps Q in smem (registers go to O).
    //
    // qa is defined on every path (zeros for an inactive consumer, which never uses
    // it). Left undefined on the inactive path (as the first version did), ptxas
    // (CUDA 13.0) treated the fragments as dead after each QK^T wgmma of the loop
    // and reused their registers for P (dk = dv = 64, prefill_ws): from the second
    // visited block on, S was P_prev K^T (the 64/64 failure of 2026-11-28).
    constexpr bool Q_REGS = DK <= 128;
    u32 qa[Q_REGS ? DK / 16 : 1][4];
#pragma unroll
    for (int ks = 0; ks < (Q_REGS ? DK / 16 : 1); ++ks) qa[ks][0] = qa[ks][1] = qa[ks][2] = qa[ks][3] = 0u;
    if (Q_REGS && active) {
#pragma unroll
        for (int ks = 0; ks < DK / 16; ++ks) ldmatrix_x4(qa[ks], sq + sw128<64>(warp * 16 + (lane & 15), ks * 16 + (lane >> 4) * 8));
    }

    float o[DV / 8][4];
#pragma unroll
    for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};
    const int row_a = warp * 16 + (lane >> 2);

    auto release = [&](int slot) {
        __syncwarp();
        if (lane == 0) mbar_arrive(empty_bar + 8 * slot);
    };

    // PIPE: block i's QK^T and the previous own block's PV are issued back to back;
    // the warpgroup waits for the QK^T only, and does block i's mask / max / exp2
    // under the PV. The previous block's stage is
    // held until its PV completes; before waiting on stage k the held stage is
    // flushed if k is STAGES or more stages past it (the producer may need its slot).
    u32 pa[4][4];  // P of the held block (PIPE) / of the current block
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) pa[kk][0] = pa[kk][1] = pa[kk][2] = pa[kk][3] = 0u;
    int held = -1, held_slot = 0;  // PIPE: stage whose PV is pending, and its slot
    auto issue_pv = [&](int vslot) {
        const u32 v_addr = sbase + S::V + vslot * 64 * DV * 2;
        if constexpr (WIDE && DV % 128 == 0) {
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
                for (int pw = 0; pw < DV / 128; ++pw) wgmma_rs<T, 128, 1>(o + pw * 16, pa[kk], wg_desc(v_addr + pw * 2 * PANEL + kk * 16 * 128, PANEL), 1);
            }
        } else {
#pragma unroll
            for (int pn = 0; pn < DV / 64; ++pn) {
#pragma unroll
                for (int kk = 0; kk < 4; ++kk) wgmma_rs<T, 64, 1>(o + pn * 8, pa[kk], wg_desc(v_addr + pn * PANEL + kk * 16 * 128), 1);
            }
        }
        wg_commit();
    };
    auto flush = [&]() {  // PIPE: the held block's PV, then release its stage
#pragma unroll
        for (int pn = 0; pn < DV / 64; ++pn) wg_hold(o + pn * 8);
        wspp_hold_a(pa);
        wg_fence();
        issue_pv(held_slot);
        wg_wait<0>();
#pragma unroll
        for (int pn = 0; pn < DV / 64; ++pn) wg_hold(o + pn * 8);
        wspp_hold_a(pa);
        release(held_slot);
        held = -1;
    };

    const int my_turn = kWsPPTurnBar + cw, other_turn = kWsPPTurnBar + (cw ^ 1);
    if (PP && cw == 1) named_bar_arrive(kWsPPTurnBar, 256);  // consumer 0 goes first

    // The list entry of the next position is read one position ahead, after this
    // position's wgmmas are issued (and after fence.proxy.async, whose MEMBAR would
    // wait for the load): its global load overlaps the softmax instead of stalling
    // the loop head.
    int k = 0, nb = 0;
    int b_next = 0;
    int mask_next = w.npos > 0 ? w.item(0, &b_next) : 0;
#pragma unroll 1
    for (int pos = 0; pos < w.npos; ++pos) {
        const int b = b_next;
        const int mask = mask_next;
        auto fetch_next = [&]() {
            if (pos + 1 < w.npos) mask_next = w.item(pos + 1, &b_next);
        };
        if (!mask) {
            fetch_next();
            continue;
        }
        const int slot = k % ST;
        if (PIPE && held >= 0 && k - held >= ST) flush();
        mbar_wait(full_bar + 8 * slot, (k / ST) & 1);
        // Not PP: stage 0 (every CTA has one: block c0): consumer 1 starts its first QK^T only
        // once consumer 0's has completed, so that the two run out of phase (one's
        // softmax under the other's wgmma) instead of in lock-step on shared stages.
        // Exactly one arrive (consumer 0) and one sync (consumer 1) per CTA, both at
        // stage 0, which needs no slot release: no hang whatever the lists hold.
        const bool stage0 = k == 0;
        const int kcur = k;
        ++k;
        if (!(mask & (1 << cw))) {
            if (PP) {
                named_bar_sync(my_turn, 256);
                named_bar_arrive(other_turn, 256);
            } else if (stage0) {
                if (cw == 0) named_bar_arrive(kWsPPOffsetBar, 256);
                else named_bar_sync(kWsPPOffsetBar, 256);
            }
            release(slot);
            fetch_next();
            continue;
        }
        if (PP) named_bar_sync(my_turn, 256);
        else if (stage0 && cw == 1) named_bar_sync(kWsPPOffsetBar, 256);
        fence_proxy_async();  // the producer's cp.async (generic proxy) writes before the wgmma reads
        const u32 k_addr = sbase + S::K + slot * 64 * DK * 2;

        // S = Q K^T (PIPE: then the held block's PV as a second group)
        float s[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        wg_hold(s);
        if (PIPE) {
#pragma unroll
            for (int pn = 0; pn < DV / 64; ++pn) wg_hold(o + pn * 8);
            wspp_hold_a(pa);
        }
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < DK / 16; ++ks) {
            const u32 off = (ks >> 2) * PANEL + (ks & 3) * 32;
            if (Q_REGS) wgmma_rs<T, 64, 0>(s, qa[Q_REGS ? ks : 0], wg_desc(k_addr + off), ks > 0);
            else wgmma_ss<T, 64, 0>(s, wg_desc(q_addr + off), wg_desc(k_addr + off), ks > 0);
        }
        wg_commit();
        const bool pv_pending = PIPE && held >= 0;
        if (pv_pending) {
            wg_fence();  // in this basic block (ptxas would inject it); waits for no wgmma
            issue_pv(held_slot);
            if (PP) named_bar_arrive(other_turn, 256);
            fetch_next();
            wg_wait<1>();
        } else {
            if (PP) named_bar_arrive(other_turn, 256);
            fetch_next();
            wg_wait<0>();
        }
        wg_hold(s);

        // 1 / rms(k) of the block's keys (double-buffered by nb parity; one barrier per block).
        float* kscale = reinterpret_cast<float*>(smem + S::KSCALE) + (cw * 2 + (nb & 1)) * 64;
        if (wk) {
            int r;
            const T* skt = reinterpret_cast<const T*>(smem + S::K + slot * 64 * DK * 2);
            const float ss = row_sumsq_sw128<T, DK, 64, 128>(skt, wtid, &r);
            if ((wtid & 1) == 0) kscale[r] = rsqrtf(ss / (float)DK + p.norm_eps);
            named_bar_sync(bar, 128);
        }
        if (!PP && stage0 && cw == 0) named_bar_arrive(kWsPPOffsetBar, 256);

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
        // The held block's PV is done (nothing pending otherwise): its stage goes back to the producer.
        wg_wait<0>();
#pragma unroll
        for (int pn = 0; pn < DV / 64; ++pn) wg_hold(o + pn * 8);
        wspp_hold_a(pa);
        if (pv_pending) {
            release(held_slot);
            held = -1;
        }
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
        held = kcur;
        held_slot = slot;
        if (!PIPE) flush();  // O += P V now, release the stage
        ++nb;
    }
    if (PIPE && held >= 0) flush();
    if (PP && cw == 0) named_bar_sync(kWsPPTurnBar, 256);  // consumer 1's last hand-over

    if (!active) return;
    // The Q tile becomes the O staging tile: every warp of this warpgroup is done
    // with its wgmma reads of Q (each waited on its last group; the barrier makes it all).
    fence_proxy_async();
    named_bar_sync(bar, 128);
    wspp_store_output<T, DV>(p, w, c, q_rows, o, l, m, sq, row_a, wtid, bar);
}

#endif  // NATSL_SM90A

} // namespace sparse
} // namespace natsl
