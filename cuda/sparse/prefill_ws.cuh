// prefill_ws.cuh: the sm_90a block-sparse flash prefill (PrefillKernel::WarpSpecialized,
// entry prefill_ws): FlashAttention-3's structure over NAtS-L's routed 64-token chunks.
//
// Persistent: one CTA per SM runs tiles in turn. Tile = 128 query rows = the chunk pair
// c0 = 2i, c1 = 2i + 1 of one (sequence, query head). CTA b starts with tile b, then
// takes the next tile from a global counter (heaviest first, as the hardware would
// dispatch one-tile CTAs); the producer claims it when it has issued the current tile's
// last stage, so the next tile's Q and first stages load under this tile's last stages
// and its epilogue. The stage loop is the one-tile kernel's. 384 threads = 3 warpgroups:
//   WG0       producer. Warp 0 walks the router list (32 entries per step, loaded in
//             parallel), packs the loaded blocks into stages and, from one thread, writes
//             each stage's descriptor (WsDesc) to shared memory and issues its TMA loads
//             through the tensor maps in the params (q, k, v as 3-D (dim, head, token)
//             tensors, 64 x 1 x 64 boxes, 128-byte swizzle): Q of both chunks once, then a
//             ring of ST stages of BN keys, one box per router block and 64-column panel, so
//             the routed gather costs nothing. With k-RMSNorm warps 1-3 compute 1 / rms(k)
//             of each stage's keys from shared memory (once for both consumers).
//   WG1, WG2  consumers; consumer w owns chunk c_w (64 rows). Per stage: S = Q K^T (wgmma
//             m64nBNk16; Q from registers for dk <= 128), online softmax in registers (exp2
//             of pre-scaled logits; masks only on a diagonal or unused block), O += P V
//             (wgmma, P from registers). Stage i's QK^T is issued together with stage
//             i-1's PV and stage i's softmax runs under that PV (intra-warpgroup overlap);
//             the two consumers take turns at issuing (ping-pong, named barriers), so one's
//             softmax runs under the other's GEMMs. They read each stage's descriptor
//             from shared memory, never the list: a list walk in the consumer loop put a
//             dependent global load on the softmax's critical path.
// Both chunks share every K/V byte loaded (the list entries < c0 and block c0).
//
// Visit sequence of the pair (ROUTED mode; BLOCKS mode runs prefill_wgmma), mirroring
// PrefillWork::next_valid per chunk (top: the largest list entry before the position):
//   A: list entries [0, len0)            WG0 if top < b < c0, WG1 if pos < len1, top < b < c1
//   B: block c0                          WG0 (causal diagonal), WG1 iff list[len0] == c0 > top
//   C: list entries [startC, len1)       WG1 if top < b < c1 (empty for a sorted list)
//   D: block c1                          WG1 (causal diagonal), only if c1 exists
// The list positions walked (A, list[len0] when listed, C) rise with the visit position, so
// the list warp finds each lane's top by a max-scan over its window, carried across
// windows; an entry >= 0 that is <= top is skipped and recorded (NATSL_FAULT_LIST_ORDER).
// Positions no consumer wants are not loaded; the loaded ones are packed BN / 64 per
// stage in order (the last stage may be half empty: its missing half is never read).
//
// mbarriers per stage slot s: kfull[s], vfull[s] (count 1: the producer's expect_tx),
// kempty[s], vempty[s] (count 256: every consumer thread), and with k-RMSNorm
// ksfull[s] (count 96: producer warps 1-3), ksempty[s] (count 256); qfull (count 1, one
// phase per tile), qempty (count 256: the consumers are done reading Q). After a tile's
// last stage a marker stage (m < 0, kfull and vfull armed without bytes) carries the next
// tile (b[0], -1: none). Stage k (counted over all tiles) uses slot k % ST with phase
// parity (k / ST) & 1. Every consumer warp waits and releases every stage (used or not,
// markers too), so no barrier ever runs two phases ahead.
//
// The epilogue stages O in tiles of its own (the Q tiles hold the next tile's Q by then).
//
// Rows past a sequence's end in its last partial chunk are loaded from the next sequence
// (or zero-filled past the tensor): keys there are masked (causal), query rows there are
// not stored.
//
// Grid order: GQA q heads of one kv head fastest, then chunk pairs (heaviest, i.e.
// latest, first), then kv heads, then sequences: CTAs running together share one
// (sequence, kv head) and its K/V stays in L2.
#pragma once
#include "common/sm90.cuh"
#include "common/wgmma.cuh"
#include "sparse/prefill_wgmma.cuh"  // fold_q_norm_sw128; prefill_work.cuh, flash.cuh through it

namespace natsl {
namespace sparse {

#if NATSL_SM90A

// Tile policy per head-dim pair (what FA3 keeps in tile_size.h).
template <int DK, int DV>
struct WsTile {
    // Keys per stage: 128 (two router blocks, one softmax rescale per 128 keys); 64 at
    // dv 256, where the O accumulator takes 128 registers and S of 128 keys would not fit.
    static constexpr int BN = DV <= 128 ? 128 : 64;
    static constexpr int HALVES = BN / 64;
    // Ring depth within 227 KB of shared memory.
    // (3 at 128/128, with O then stored from registers: -1.6% dense; 4 at 64/128 likewise:
    // +0.4% at rho 1, -2% at rho 0.1. 2026-12-04 run g.)
    static constexpr int ST = (DK + DV) >= 256 ? 2 : 3;
    // Rescale O only when a row maximum grows by more than 2^8 in exp2 units (P then stays
    // <= 256, exact after the final 1 / l): at 64/128, where the softmax outweighs the
    // halved Q K^T, +1-3% at rho 1-0.1; at 128/128 -0.8% (2026-12-04 runs h, i), so off.
    static constexpr float RESCALE_LOG2 = DK <= 64 ? 8.f : 0.f;
    // Q K^T with Q from registers (from shared memory: -2.2% dense, -6% at 64/128, run m).
    static constexpr bool Q_REGS = DK <= 128;
    static constexpr int PANEL64 = 64 * 128;                    // bytes of a 64-row x 64-column panel
    static constexpr int KPANEL = BN * 128;                     // bytes of a BN-row panel of a stage
    static constexpr int QBYTES = 64 * DK * 2;
    static constexpr int KBYTES = BN * DK * 2;
    static constexpr int VBYTES = BN * DV * 2;
    static constexpr int OBYTES = 64 * DV * 2;
    static constexpr int Q = 0;                                 // 2 x [64][DK] sw128
    static constexpr int K = Q + 2 * QBYTES;                    // ST x [BN][DK] sw128
    static constexpr int V = K + ST * KBYTES;                   // ST x [BN][DV] sw128
    static constexpr int O = V + ST * VBYTES;                   // 2 x [64][DV] O staging, if it fits
    static constexpr int TAIL = ST * BN * 4 + ((6 * ST + 2) * 8 + 15) / 16 * 16 + ST * 16 + 32 * 8 + 1024;
    // The epilogue stages O for 16-byte stores where shared memory allows (all but
    // 256/256): 4-byte stores from the accumulators cost 1.3% at dense d128 and 4.6% at
    // rho 0.1 (2026-12-04 run 2).
    static constexpr bool STAGE_O = O + 2 * OBYTES + TAIL <= 232448;
    static constexpr int KSCALE = O + (STAGE_O ? 2 * OBYTES : 0); // ST x [BN] f32 1 / rms(k)
    static constexpr int BAR = KSCALE + ST * BN * 4;            // 6 ST + 2 mbarriers
    static constexpr int NBAR = 6 * ST + 2;
    static constexpr int DESC = BAR + (NBAR * 8 + 15) / 16 * 16; // ST x WsDesc: the stage in each slot
    static constexpr int ITEMS = DESC + ST * 16;                // 32 x int2: the list walk's window
    static constexpr int BYTES = ITEMS + 32 * 8 + 1024;         // + alignment slack
};

// Registers after setmaxnreg: 128 * 40 + 256 * 232 = 64512, the CTA's allocation at launch
// (384 threads at the 168 of __launch_bounds__(384, 1)).
// (24 / 240, FA3's split, spills 44 bytes in the producer's list walk and lost 1-1.5% on
// every shape, 2026-12-04 run j: the consumers' extra 8 registers buy nothing.)
constexpr int kWsProducerRegs = 40;
constexpr int kWsConsumerRegs = 232;
// Named barrier ids (0 is __syncthreads): 1, 2 = consumer warpgroup 0, 1 (128 threads);
// 4, 5 = the ping-pong turns of consumer 0, 1 (256 threads, bar.sync by the owner,
// bar.arrive by the other). Without the turns: -2.6% at 64/128, +-0 dense (run m).
constexpr int kWsTurnBar = 4;

// Entries of the sorted list[0, n) below x, by a whole warp: each round probes 32 evenly
// spaced entries at once and keeps the 1/32 of the range that holds the bound.
__device__ __forceinline__ int warp_lower_bound(const int* list, int n, int x, int lane) {
    int lo = 0, hi = n;  // the bound lies in [lo, hi]
    while (hi - lo > 32) {
        const int step = (hi - lo + 31) >> 5;
        const int pos = min(lo + (lane + 1) * step - 1, hi - 1);
        const int c = __popc(__ballot_sync(0xffffffffu, list[pos] < x));
        const int nhi = min(hi, lo + (c + 1) * step - 1);
        lo = min(lo + c * step, hi);
        hi = max(nhi, lo);
    }
    const bool below = lane < hi - lo && list[lo + lane] < x;
    return lo + __popc(__ballot_sync(0xffffffffu, below));
}

// The CTA's pair of chunks and the visit sequence (see the file comment).
struct WsWork {
    int j, n, c0, seq0, len, kvh;
    bool has1;           // chunk c1 = c0 + 1 exists
    int q_rows0, q_rows1;
    const int* list;
    int len0, len1, startC, nC, npos;
    bool c0_listed;      // WG1 sees block c0 (list[len0] == c0)

    // Tile geometry (every thread; uniform over the CTA). The list bounds are left to the
    // producer's list warp (find_bounds): no consumer reads the list.
    __device__ __forceinline__ bool init(const NatslSparsePrefillParams& p, int tile) {
        const int Hq = p.num_q_heads, Hkv = p.num_kv_heads;
        const int G = Hq / Hkv;
        const int P = (p.batch.max_chunks + 1) >> 1;
        int lin = tile;
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
        return true;
    }
    // The visit sequence's bounds, by one warp (32-way searches: 2-3 rounds of parallel
    // loads where a binary search took 7-11 dependent ones; the CTA's first K stage waits
    // on this). Same result as a binary lower bound on a sorted list; in range on any list.
    __device__ __forceinline__ void find_bounds(const NatslSparsePrefillParams& p, int lane) {
        const int mh = j / (p.num_q_heads / p.num_mask_heads);
        list = p.attn_list + (i64)mh * p.batch.num_slots + (seq0 / NATSL_CHUNK + n);  // slot_base(cu_seqlens, n)
        // At most the sequence's chunk count, as PrefillWork::init.
        const int cnt = min(max(p.attn_count[n * p.num_mask_heads + mh], 0), (len + 63) >> 6);
        len0 = warp_lower_bound(list, cnt, c0, lane);
        len1 = has1 ? warp_lower_bound(list, cnt, c0 + 1, lane) : 0;
        c0_listed = has1 && len1 > len0 && list[len0] == c0;
        startC = len0 + (c0_listed ? 1 : 0);
        nC = has1 ? max(len1 - startC, 0) : 0;
        npos = len0 + 1 + nC + (has1 ? 1 : 0);
    }
    // The list entry at visit position `pos` (-1 at blocks c0, c1 unless c0 is listed).
    __device__ __forceinline__ int entry(int pos) const {
        if (pos < len0) return list[pos];
        pos -= len0;
        if (pos == 0) return c0_listed ? c0 : -1;
        pos -= 1;
        return pos < nC ? list[startC + pos] : -1;
    }
    // Block at visit position `pos` and which consumers use it (bit w: consumer w; 0: skip),
    // given its entry x and top, the largest list entry before it (>= -1).
    __device__ __forceinline__ int item(int pos, int x, int top, int* b) const {
        const bool fresh = x > top;  // implies x >= 0
        if (pos < len0) {
            *b = x;
            const int m0 = (fresh && x < c0) ? 1 : 0;
            const int m1 = (has1 && pos < len1 && fresh && x < c0 + 1) ? 2 : 0;
            return m0 | m1;
        }
        pos -= len0;
        if (pos == 0) {
            *b = c0;
            return 1 | (c0_listed && fresh ? 2 : 0);
        }
        pos -= 1;
        if (pos < nC) {
            *b = x;
            return (fresh && x < c0 + 1) ? 2 : 0;
        }
        *b = c0 + 1;
        return 2;
    }
};

// What a stage slot holds, written by the producer before it arms the slot's kfull
// barrier: block b[h] in half h, used by consumer w iff bit 2h + w of m; m < 0 marks the
// end of the CTA's stages. (A half no consumer uses holds a copy of the stage's first
// block: every half holds finite data.)
struct WsDesc {
    int b[2];
    int m;
    int pad;
};

// Keep the P fragments unmodified until the PV wgmma reading them was waited on.
template <int NK>
__device__ __forceinline__ void ws_hold_p(u32 (*a)[4]) {
#pragma unroll
    for (int i = 0; i < NK; ++i) asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3]) :: "memory");
}

// Tiles in the grid order of the file comment: pairs x heads x sequences.
__device__ __forceinline__ int ws_num_tiles(const NatslSparsePrefillParams& p) {
    return ((p.batch.max_chunks + 1) >> 1) * p.num_q_heads * p.batch.num_seqs;
}

// The next tile of this CTA (one thread): the counter's next non-empty tile past the
// grid's static first tiles, or -1. The CTA that takes the last claim rewinds the
// counters for the next launch on the stream.
__device__ __forceinline__ int ws_claim_tile(const NatslSparsePrefillParams& p) {
    const int n = ws_num_tiles(p);
    if ((int)gridDim.x >= n) return -1;  // one CTA per tile: nothing to claim
    int t;
    WsWork probe;
    do {
        t = atomicAdd(p.tile_counter, 1) + (int)gridDim.x;
    } while (t < n && !probe.init(p, t));
    if (t < n) return t;
    __threadfence();  // this CTA's claims before its count
    if (atomicAdd(p.tile_counter + 1, 1) == (int)gridDim.x - 1) {
        // Every CTA has made its last claim: nobody reads the counters again in this launch.
        atomicExch(p.tile_counter, 0);
        atomicExch(p.tile_counter + 1, 0);
    }
    return -1;
}

// Epilogue of one consumer warpgroup (128 threads, `wtid` its thread index, named
// barrier `bar`): O / l and lse, for the warpgroup's chunk `c`. Through the staging tile
// `so` ([64][DV] sw128, 16-byte stores), or without one (null) straight from the
// accumulators (row_a and row_a + 8, 2 columns of every 8 a lane).
template <typename T, int DV>
__device__ __forceinline__ void ws_store_output(const NatslSparsePrefillParams& p, const WsWork& w, int c, int q_rows, const float (&o)[DV / 8][4],
                                                float (&l)[2], const float (&m)[2], T* so, int row_a, int wtid, int bar) {
    const int lane = wtid & 31;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    const float inv0 = l[0] > 0.f ? 1.f / l[0] : 0.f;
    const float inv1 = l[1] > 0.f ? 1.f / l[1] : 0.f;
    const i64 t0 = w.seq0 + (i64)c * 64;
    const bool st0 = row_a < q_rows, st1 = row_a + 8 < q_rows;
    if (so) {
        named_bar_sync(bar, 128);  // the warpgroup's reads of the last tile's O are done
#pragma unroll
        for (int ot = 0; ot < DV / 8; ++ot) {
            const int col = ot * 8 + 2 * (lane & 3);
            *reinterpret_cast<u32*>(so + swz<DV>(row_a, col)) = pack2<T>(o[ot][0] * inv0, o[ot][1] * inv0);
            *reinterpret_cast<u32*>(so + swz<DV>(row_a + 8, col)) = pack2<T>(o[ot][2] * inv1, o[ot][3] * inv1);
        }
        named_bar_sync(bar, 128);
        T* og = reinterpret_cast<T*>(p.o) + t0 * p.o_stride_t + (i64)w.j * p.o_stride_h;
        constexpr int CPR = DV / 8;
#pragma unroll
        for (int i = wtid; i < 64 * CPR; i += 128) {
            const int r = i / CPR, col = (i % CPR) * 8;
            if (r < q_rows) *reinterpret_cast<vec8*>(og + (i64)r * p.o_stride_t + col) = *reinterpret_cast<const vec8*>(so + swz<DV>(r, col));
        }
    } else {
        T* og = reinterpret_cast<T*>(p.o) + (t0 + row_a) * p.o_stride_t + (i64)w.j * p.o_stride_h + 2 * (lane & 3);
#pragma unroll
        for (int ot = 0; ot < DV / 8; ++ot) {
            if (st0) *reinterpret_cast<u32*>(og + ot * 8) = pack2<T>(o[ot][0] * inv0, o[ot][1] * inv0);
            if (st1) *reinterpret_cast<u32*>(og + 8 * p.o_stride_t + ot * 8) = pack2<T>(o[ot][2] * inv1, o[ot][3] * inv1);
        }
    }
    // m is in raw-score units: lse = ln(sum exp(scale * s)) = (m * scale_log2 + log2 l) * ln 2.
    if (p.lse && (lane & 3) == 0) {
        if (st0) p.lse[(t0 + row_a) * p.lse_stride_t + w.j] = l[0] > 0.f ? (m[0] * p.scale_log2 + __log2f(l[0])) * kLn2 : neg_inf();
        if (st1) p.lse[(t0 + row_a + 8) * p.lse_stride_t + w.j] = l[1] > 0.f ? (m[1] * p.scale_log2 + __log2f(l[1])) * kLn2 : neg_inf();
    }
}

template <typename T, int DK, int DV>
__device__ void sparse_prefill_ws(const NatslSparsePrefillParams& p) {
    static_assert(DK % 64 == 0 && DV % 64 == 0 && DK <= 256 && DV <= 256, "head dims");
    using S = WsTile<DK, DV>;
    constexpr int ST = S::ST, BN = S::BN, HALVES = S::HALVES;
    constexpr int NKK = BN / 16;  // k-steps of O += P V per stage
    constexpr bool Q_REGS = S::Q_REGS;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 raw_addr = smem_u32(smem_raw);
    unsigned char* smem = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
    const u32 sbase = smem_u32(smem);
    const u32 bar0 = sbase + S::BAR;
    auto kfull = [&](int s) { return bar0 + 8 * s; };
    auto vfull = [&](int s) { return bar0 + 8 * (ST + s); };
    auto kempty = [&](int s) { return bar0 + 8 * (2 * ST + s); };
    auto vempty = [&](int s) { return bar0 + 8 * (3 * ST + s); };
    auto ksfull = [&](int s) { return bar0 + 8 * (4 * ST + s); };
    auto ksempty = [&](int s) { return bar0 + 8 * (5 * ST + s); };
    const u32 q_bar = bar0 + 8 * (6 * ST);
    const u32 q_empty = q_bar + 8;
    float* kscale_all = reinterpret_cast<float*>(smem + S::KSCALE);
    const bool knorm = p.k_norm_w != nullptr;

    const int tid = threadIdx.x;
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < ST; ++s) {
            mbar_init(kfull(s), 1);
            mbar_init(vfull(s), 1);
            mbar_init(kempty(s), 256);
            mbar_init(vempty(s), 256);
            mbar_init(ksfull(s), 96);
            mbar_init(ksempty(s), 256);
        }
        mbar_init(q_bar, 1);
        mbar_init(q_empty, 256);
        mbar_init_fence();
    }
    __syncthreads();

    const int wg = tid >> 7;  // 0 producer, 1 / 2 consumers
    WsDesc* desc = reinterpret_cast<WsDesc*>(smem + S::DESC);
    if (wg == 0) {
        // ------------------------------------------------------------ producer
        reg_dealloc<kWsProducerRegs>();
        const int pwarp = tid >> 5, plane = tid & 31;
        if (pwarp == 0) {
            // Warp 0 walks the list, 32 positions per step (one load each, in parallel),
            // packs the loaded blocks HALVES per stage, and lane 0 publishes each stage's
            // descriptor and issues its TMA loads. The consumers never read the list.
            if (plane == 0) {
                tma_prefetch_desc(&p.tma_q);
                tma_prefetch_desc(&p.tma_k);
                tma_prefetch_desc(&p.tma_v);
            }
            int2* items = reinterpret_cast<int2*>(smem + S::ITEMS);
            int k = 0, tile = blockIdx.x;
#pragma unroll 1
            for (int it = 0;; ++it) {
                WsWork w;
                const bool valid = w.init(p, tile);
                if (plane == 0) {
                    if (it > 0) mbar_wait(q_empty, (it - 1) & 1);  // the consumers hold the last Q
                    if (valid) {
                        mbar_arrive_expect_tx(q_bar, (w.has1 ? 2 : 1) * 64 * DK * 2);
#pragma unroll
                        for (int pn = 0; pn < DK / 64; ++pn) {
                            tma_load_3d(sbase + S::Q + pn * S::PANEL64, &p.tma_q, q_bar, pn * 64, w.j, w.seq0 + w.c0 * 64);
                            if (w.has1) tma_load_3d(sbase + S::Q + S::QBYTES + pn * S::PANEL64, &p.tma_q, q_bar, pn * 64, w.j, w.seq0 + w.c0 * 64 + 64);
                        }
                    } else {
                        mbar_arrive(q_bar);  // an empty tile: the phase completes, nobody waits
                    }
                }
                if (valid) {
                    w.find_bounds(p, plane);  // Q is on its way meanwhile
                    int base = 0, idx = 0, avail = 0;
                    int carry = -1;  // the largest list entry of the earlier windows
#pragma unroll 1
                    for (;; ++k) {
                        int b[2] = {0, 0}, m = 0, h = 0;
                        while (h < HALVES) {
                            if (idx == avail) {
                                if (base >= w.npos) break;
                                __syncwarp();  // the window's previous entries are read
                                const bool in = base + plane < w.npos;
                                const int e = in ? w.entry(base + plane) : -1;
                                // top: the largest entry before this lane's (a max-scan).
                                int run = e;
#pragma unroll
                                for (int o = 1; o < 32; o <<= 1) {
                                    const int y = __shfl_up_sync(0xffffffffu, run, o);
                                    if (plane >= o) run = max(run, y);
                                }
                                const int up = __shfl_up_sync(0xffffffffu, run, 1);
                                const int top = plane == 0 ? carry : max(up, carry);
                                carry = max(carry, __shfl_sync(0xffffffffu, run, 31));
                                if (e >= 0 && e <= top) report_fault(p.faults, NATSL_FAULT_LIST_ORDER);
                                int x = 0, mk = 0;
                                if (in) mk = w.item(base + plane, e, top, &x);
                                items[plane] = make_int2(x, mk);
                                __syncwarp();
                                avail = min(32, w.npos - base);
                                base += 32;
                                idx = 0;
                            }
                            const int2 it2 = items[idx++];
                            if (it2.y) {
                                if (h == 0) b[0] = it2.x;
                                else b[1] = it2.x;
                                m |= it2.y << (2 * h);
                                ++h;
                            }
                        }
                        if (h == 0) break;  // the tile's stages are out
                        const int slot = k % ST;
                        const u32 ph = (k / ST) & 1;
                        if (plane == 0) {
                            if (k >= ST) {
                                mbar_wait(kempty(slot), ph ^ 1);
                                if (knorm) mbar_wait(ksfull(slot), ph ^ 1);  // the scale warps are done reading K
                            }
                            if (h < HALVES) b[1] = b[0];
                            desc[slot] = WsDesc{{b[0], b[1]}, m, 0};
                            mbar_arrive_expect_tx(kfull(slot), HALVES * 64 * DK * 2);
#pragma unroll
                            for (int hh = 0; hh < HALVES; ++hh) {
#pragma unroll
                                for (int pn = 0; pn < DK / 64; ++pn)
                                    tma_load_3d(sbase + S::K + slot * S::KBYTES + pn * S::KPANEL + hh * S::PANEL64, &p.tma_k, kfull(slot), pn * 64, w.kvh, w.seq0 + b[hh] * 64);
                            }
                            if (k >= ST) mbar_wait(vempty(slot), ph ^ 1);
                            mbar_arrive_expect_tx(vfull(slot), HALVES * 64 * DV * 2);
#pragma unroll
                            for (int hh = 0; hh < HALVES; ++hh) {
#pragma unroll
                                for (int pn = 0; pn < DV / 64; ++pn)
                                    tma_load_3d(sbase + S::V + slot * S::VBYTES + pn * S::KPANEL + hh * S::PANEL64, &p.tma_v, vfull(slot), pn * 64, w.kvh, w.seq0 + b[hh] * 64);
                            }
                        }
                        __syncwarp();
                    }
                }
                // The marker: the next tile (claimed now, as the hardware would dispatch
                // a CTA when an SM frees up), with no bytes.
                // (Claimed at the tile's start instead: -1.5% dense, 2026-12-04 run 2.)
                int next = 0;
                if (plane == 0) next = ws_claim_tile(p);
                next = __shfl_sync(0xffffffffu, next, 0);
                const int slot = k % ST;
                const u32 ph = (k / ST) & 1;
                if (plane == 0) {
                    if (k >= ST) {
                        mbar_wait(kempty(slot), ph ^ 1);
                        if (knorm) mbar_wait(ksfull(slot), ph ^ 1);
                        mbar_wait(vempty(slot), ph ^ 1);
                    }
                    desc[slot] = WsDesc{{next, 0}, -1, 0};
                    mbar_arrive(kfull(slot));
                    mbar_arrive(vfull(slot));
                }
                __syncwarp();
                ++k;
                if (next < 0) break;
                tile = next;
            }
            return;
        }
        if (!knorm) return;
        // Warps 1-3 (k-RMSNorm): 1 / rms(k) of each stage's keys, once for both consumers.
        // A slot's scales are rewritten only after both consumers read them (ksempty).
        const int t = tid - 32;
#pragma unroll 1
        for (int k = 0;; ++k) {
            const int slot = k % ST;
            const u32 ph = (k / ST) & 1;
            mbar_wait(kfull(slot), ph);
            const WsDesc d = desc[slot];
            if (k >= ST) mbar_wait(ksempty(slot), ph ^ 1);
            if (d.m < 0) {  // a marker: its phase completes with no scales
                mbar_arrive(ksfull(slot));
                if (d.b[0] < 0) break;
                continue;
            }
            const T* sk = reinterpret_cast<const T*>(smem + S::K + slot * S::KBYTES);
            for (int row = t; row < BN; row += 96) {
                float ss = 0.f;
#pragma unroll
                for (int c = 0; c < DK; c += 8) {
                    float f[8];
                    unpack8<T>(*reinterpret_cast<const vec8*>(sk + sw128<BN>(row, c)), f);
#pragma unroll
                    for (int i = 0; i < 8; ++i) ss += f[i] * f[i];
                }
                kscale_all[slot * BN + row] = rsqrtf(ss / (float)DK + p.norm_eps);
            }
            mbar_arrive(ksfull(slot));
        }
        return;
    }

    // ---------------------------------------------------------------- consumers
    reg_alloc<kWsConsumerRegs>();
    int cw = wg - 1;                    // consumer index = chunk c0 + cw
    int wtid = tid & 127, warp = wtid >> 5, lane = tid & 31;
    const int bar = 1 + cw;             // named barrier of this warpgroup
    const unsigned long long qd = wg_desc(sbase + S::Q + cw * S::QBYTES);  // Q from smem (dk > 128)
    T* sq = reinterpret_cast<T*>(smem + S::Q + cw * S::QBYTES);
    T* so = S::STAGE_O ? reinterpret_cast<T*>(smem + S::O + cw * S::OBYTES) : nullptr;
    const T* wq = reinterpret_cast<const T*>(p.q_norm_w);
    const T* wk = reinterpret_cast<const T*>(p.k_norm_w);
    const float sl2 = p.scale_log2;  // > 0 (validated): max of raw scores = max of scaled
    // Raw-score step by which a row maximum must grow before O is rescaled (0: any growth).
    const float rescale_thr = S::RESCALE_LOG2 / sl2;
    int row_a = warp * 16 + (lane >> 2);

    // Every consumer thread arrives itself, after its own reads of the slot (the
    // descriptor, the k scales): each read is then ordered before the refill by one
    // thread's release / the producer's acquire, which compute-sanitizer racecheck
    // follows (a lane-0 arrival after __syncwarp it reports as a race).
    auto release = [&](u32 b) { mbar_arrive(b); };

    float o[DV / 8][4];
    u32 pa[NKK][4];  // P of the held stage (the A operand of its PV)
#pragma unroll
    for (int kk = 0; kk < NKK; ++kk) pa[kk][0] = pa[kk][1] = pa[kk][2] = pa[kk][3] = 0u;
    int held = -1, held_slot = 0;  // stage whose PV is pending, and its slot
    u32 held_ph = 0;
    auto issue_pv = [&]() {
        const unsigned long long vd = wg_desc(sbase + S::V + held_slot * S::VBYTES, S::KPANEL);
        // Every k-step, unused halves too (P = 0 there): a wgmma under a condition makes
        // ptxas serialise every wgmma of the kernel (C7520).
#pragma unroll
        for (int kk = 0; kk < NKK; ++kk) wgmma_rs<T, DV, 1>(o, pa[kk], wg_desc_add(vd, kk * 16 * 128), 1);
        wg_commit();
    };
    auto rescale = [&](const float (&a)[2]) {
        // Only when a row maximum moved (after the first blocks, rarely).
        if (__any_sync(0xffffffffu, a[0] != 1.f || a[1] != 1.f)) {
#pragma unroll
            for (int ot = 0; ot < DV / 8; ++ot) {
                o[ot][0] *= a[0];
                o[ot][1] *= a[0];
                o[ot][2] *= a[1];
                o[ot][3] *= a[1];
            }
        }
    };
    auto flush = [&]() {  // the held stage's PV now, then release its V
        wg_hold<DV / 8>(o);
        ws_hold_p<NKK>(pa);
        mbar_wait(vfull(held_slot), held_ph);
        wg_fence();
        issue_pv();
        wg_wait<0>();
        wg_hold<DV / 8>(o);
        ws_hold_p<NKK>(pa);
        release(vempty(held_slot));
        held = -1;
    };

    const int my_turn = kWsTurnBar + cw, other_turn = kWsTurnBar + (cw ^ 1);
    if (cw == 1) named_bar_arrive(kWsTurnBar, 256);  // consumer 0 goes first

    int k = 0, tile = blockIdx.x;
#pragma unroll 1
    for (int it = 0;; ++it) {
        WsWork w;
        const bool valid = w.init(p, tile);
        const int c = w.c0 + cw;
        const bool active = valid && (cw == 0 || w.has1);
        if (active) {
            mbar_wait(q_bar, it & 1);
            if (wq || wk) {
                fold_q_norm_sw128<T, DK, 64, 128>(sq, wq, wk, p.norm_eps, wtid);
                fence_proxy_async();  // generic writes of Q before the wgmma reads
                named_bar_sync(bar, 128);
            }
        }
        // Q fragments (dk <= 128), defined on every path: zeros for an inactive consumer.
        // (Left undefined there, ptxas reused their registers for P: see bench/NOTES.md, 64/64.)
        u32 qa[Q_REGS ? DK / 16 : 1][4];
#pragma unroll
        for (int ks = 0; ks < (Q_REGS ? DK / 16 : 1); ++ks) qa[ks][0] = qa[ks][1] = qa[ks][2] = qa[ks][3] = 0u;
        if (Q_REGS && active) {
#pragma unroll
            for (int ks = 0; ks < DK / 16; ++ks) ldmatrix_x4(qa[ks], sq + sw128<64>(warp * 16 + (lane & 15), ks * 16 + (lane >> 4) * 8));
        }
        if (Q_REGS) release(q_empty);  // Q is in registers: the producer may load the next one
#pragma unroll
        for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
        float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};  // m in raw-score units
        int next = -1;
        // Opaque per tile: ptxas otherwise re-reads %tid inside the stage loop (17 S2R at
        // d128) and schedules it worse: pinned, dense +0.4%, rho 0.1 +1.5% (run g).
        asm volatile("" : "+r"(cw), "+r"(lane), "+r"(row_a));

#pragma unroll 1
        for (;; ++k) {
            const int slot = k % ST;
            const u32 ph = (k / ST) & 1;
            if (held >= 0 && k - held >= ST) flush();  // the producer needs the held stage's V slot
            mbar_wait(kfull(slot), ph);
            const WsDesc d = desc[slot];
            if (d.m < 0) {  // the tile's marker: release it like an unused stage
                next = d.b[0];
                release(kempty(slot));
                mbar_wait(vfull(slot), ph);
                release(vempty(slot));
                if (knorm) {
                    mbar_wait(ksfull(slot), ph);
                    release(ksempty(slot));
                }
                ++k;
                break;
            }
            int use = 0;  // halves this consumer uses
#pragma unroll
            for (int h = 0; h < HALVES; ++h) use |= ((d.m >> (2 * h + cw)) & 1) << h;
            if (!use) {
                named_bar_sync(my_turn, 256);
                named_bar_arrive(other_turn, 256);
                release(kempty(slot));
                mbar_wait(vfull(slot), ph);
                release(vempty(slot));
                if (knorm) {
                    mbar_wait(ksfull(slot), ph);
                    release(ksempty(slot));
                }
                continue;
            }
            named_bar_sync(my_turn, 256);
            const u32 k_addr = sbase + S::K + slot * S::KBYTES;

            // S = Q K^T, then the held stage's PV as a second group
            float s[BN / 8][4];
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
            wg_hold<BN / 8>(s);
            wg_hold<DV / 8>(o);
            ws_hold_p<NKK>(pa);
            wg_fence();
            const unsigned long long kd = wg_desc(k_addr);
#pragma unroll
            for (int ks = 0; ks < DK / 16; ++ks) {
                const u32 off = (ks >> 2) * S::KPANEL + (ks & 3) * 32;
                if constexpr (Q_REGS) wgmma_rs<T, BN, 0>(s, qa[ks], wg_desc_add(kd, off), ks > 0);
                else wgmma_ss<T, BN, 0>(s, wg_desc_add(qd, (ks >> 2) * S::PANEL64 + (ks & 3) * 32), wg_desc_add(kd, off), ks > 0);
            }
            wg_commit();
            const bool pv_pending = held >= 0;
            if (pv_pending) {
                mbar_wait(vfull(held_slot), held_ph);
                wg_fence();  // in this basic block (ptxas would inject it); waits for no wgmma
                issue_pv();
                named_bar_arrive(other_turn, 256);
                wg_wait<1>();
            } else {
                named_bar_arrive(other_turn, 256);
                wg_wait<0>();
            }
            wg_hold<BN / 8>(s);
            release(kempty(slot));  // S is in registers: the K slot goes back to the producer

            // Per-key 1 / rms(k) (k-RMSNorm): scores to normalised-key units.
            if (knorm) {
                mbar_wait(ksfull(slot), ph);
                const float* ksc = kscale_all + slot * BN;
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
                    const float2 f = *reinterpret_cast<const float2*>(ksc + nt * 8 + 2 * (lane & 3));
                    s[nt][0] *= f.x;
                    s[nt][1] *= f.y;
                    s[nt][2] *= f.x;
                    s[nt][3] *= f.y;
                }
                release(ksempty(slot));
            }
            // Masks: an unused half (the other consumer's block) and the causal diagonal.
            bool full = use == (1 << HALVES) - 1;
#pragma unroll
            for (int h = 0; h < HALVES; ++h) full = full && d.b[h] != c;
            if (!full) {
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
                    const int h = nt / 8;
                    const bool used_h = (use >> h) & 1;
                    const bool diag_h = d.b[h] == c;
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int key = (nt % 8) * 8 + 2 * (lane & 3) + (e & 1);
                        const int row = row_a + (e >> 1) * 8;
                        if (!used_h || (diag_h && key > row)) s[nt][e] = neg_inf();
                    }
                }
            }
            // Online softmax on raw scores; exp2(s * scale_log2 - m * scale_log2) as one FFMA.
            float alpha[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = neg_inf();
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                // With a threshold the kept maximum may trail the true one: P <= 2^RESCALE_LOG2.
                const float m_new = S::RESCALE_LOG2 > 0.f ? (mx > m[r] + rescale_thr ? mx : m[r]) : fmaxf(m[r], mx);
                const float m_use = m_new == neg_inf() ? 0.f : m_new;
                const float mc = m_use * sl2;
                alpha[r] = fast_exp2(m[r] * sl2 - mc);
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
                    s[nt][2 * r] = fast_exp2(fmaf(s[nt][2 * r], sl2, -mc));
                    s[nt][2 * r + 1] = fast_exp2(fmaf(s[nt][2 * r + 1], sl2, -mc));
                    sum += s[nt][2 * r] + s[nt][2 * r + 1];
                }
                l[r] = l[r] * alpha[r] + sum;
                m[r] = m_new;
            }
            // The held stage's PV is done (nothing pending otherwise): its V goes back.
            wg_wait<0>();
            wg_hold<DV / 8>(o);
            ws_hold_p<NKK>(pa);
            if (pv_pending) release(vempty(held_slot));
            rescale(alpha);
#pragma unroll
            for (int kk = 0; kk < NKK; ++kk) {
                pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
                pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
                pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            }
            held = k;
            held_slot = slot;
            held_ph = ph;
        }
        if (held >= 0) flush();
        if (!Q_REGS) release(q_empty);  // every QK^T of the tile read Q from smem and is done
        {
            // The geometry again (L1 hits) rather than live across the stage loop.
            WsWork we;
            const bool valid_e = we.init(p, tile);
            if (valid_e && (cw == 0 || we.has1)) ws_store_output<T, DV>(p, we, we.c0 + cw, cw == 0 ? we.q_rows0 : we.q_rows1, o, l, m, so, row_a, wtid, bar);
        }
        if (next < 0) break;
        tile = next;
    }
    if (cw == 0) named_bar_sync(kWsTurnBar, 256);  // consumer 1's last hand-over
}

#endif  // NATSL_SM90A

} // namespace sparse
} // namespace natsl
