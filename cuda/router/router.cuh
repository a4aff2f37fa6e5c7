// router.cuh: the router of SPEC.md section 3, two launches (pool + score, then select).
//
// Pool + score. One CTA of TILE_THREADS = 128 per (chunk slot, 256-column slice of
// D): lane l owns 8 columns, warp w rows w, w + 4, ... of the chunk, and every
// thread issues its 16 row loads (16 B each, evict-first) before the first add,
// so a CTA has its whole 32 KB tile in flight and then finishes fast: one barrier,
// a fixed-order sum of the four warps' partials, the rounding of m_c, and the
// slice's partial logits (warp w scores rows w, w + 4, ... of W_score, four rows
// per batch of loads). Partials go to partial_logits [slices, slots, 2 Hr]
// (p.d_split = slices); partials, not atomics, keep the sums deterministic.
//
// Select. One CTA per (sequence, head), its own launch after the pool, selects with
// all its threads: logits and margins for NT x 4 chunks at a time, a block-wide
// MSB-first radix select for top-k, and block-wide scans for the labels and the
// compact list. (Removed, see bench/NOTES.md: a fused launch, whose last pool CTAs
// spin-waited on a per-sequence counter; the blocked pool of one CTA per (chunk, D
// split) with a warp-per-head select, slower at every measured shape.)
#pragma once
#include "common/dtype.cuh"
#include "common/varlen.cuh"

namespace natsl {

// Order-preserving float -> uint key (larger float, larger key).
__device__ __forceinline__ u32 margin_key(float m) {
    u32 u = __float_as_uint(m);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ u32 lanemask_lt() {
    u32 m;
    asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
    return m;
}

constexpr int TILE_THREADS = 128;
constexpr int TILE_COLS = NATSL_ROUTER_TILE_COLS;  // 32 lanes x 8 columns
constexpr int TILE_ROWS_PER_THREAD = NATSL_CHUNK / (TILE_THREADS / 32);
static_assert(TILE_COLS == 256, "one warp spans a slice");

// 16-byte load that asks L2 to evict the line first (x is read exactly once).
__device__ __forceinline__ vec8 ld_stream16(const void* p) {
    vec8 v;
    asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3]) : "l"(p));
    return v;
}

// Exclusive block-wide prefix count of `flag` over NT threads, and the total.
// `warp_tot` is NT / 32 ints of shared memory; the call has two barriers.
template <int NT>
__device__ __forceinline__ int block_excl_count(bool flag, int* warp_tot, int* total) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const u32 b = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) warp_tot[warp] = __popc(b);
    __syncthreads();
    int before = __popc(b & lanemask_lt()), all = 0;
#pragma unroll
    for (int w = 0; w < NT / 32; ++w) {
        const int t = warp_tot[w];
        if (w < warp) before += t;
        all += t;
    }
    __syncthreads();  // warp_tot is reused by the next call
    *total = all;
    return before;
}

template <typename T>
__device__ __forceinline__ void tile_pool_score(const NatslRouterParams& p, int slot, int n, int c, int slice, float* red, float* m) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int t0 = p.batch.cu_seqlens[n] + c * NATSL_CHUNK;
    const int rows = min(NATSL_CHUNK, p.batch.cu_seqlens[n + 1] - t0);
    const int col0 = slice * TILE_COLS;
    const int cols = min(TILE_COLS, p.d_model - col0);  // a multiple of 8
    const bool active = lane * 8 < cols;

    // All 16 loads first, then the adds.
    const T* base = reinterpret_cast<const T*>(p.x) + (i64)t0 * p.x_stride_t + col0 + lane * 8;
    vec8 v[TILE_ROWS_PER_THREAD];
#pragma unroll
    for (int i = 0; i < TILE_ROWS_PER_THREAD; ++i) {
        const int r = warp + i * (TILE_THREADS / 32);
        if (active && r < rows) v[i] = ld_stream16(base + (i64)r * p.x_stride_t);
        else v[i].w[0] = v[i].w[1] = v[i].w[2] = v[i].w[3] = 0u;  // +0 in bf16 and f16
    }
    // Every load is issued before any add: without this the compiler interleaves
    // the adds (seen for f16) and keeps fewer loads in flight.
#pragma unroll
    for (int i = 0; i < TILE_ROWS_PER_THREAD; ++i)
        asm volatile("" : "+r"(v[i].w[0]), "+r"(v[i].w[1]), "+r"(v[i].w[2]), "+r"(v[i].w[3]));
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < TILE_ROWS_PER_THREAD; ++i) {
        float f[8];
        unpack8<T>(v[i], f);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] += f[e];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) red[warp * TILE_COLS + lane * 8 + e] = acc[e];
    __syncthreads();
    // m_c over the slice: the four warps' partials in a fixed order, rounded like the model.
    for (int e = threadIdx.x; e < TILE_COLS; e += TILE_THREADS) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < TILE_THREADS / 32; ++w) s += red[w * TILE_COLS + e];
        float mean = s / (float)rows;
        if (p.round_mean) mean = round_to<T>(mean);
        m[e] = mean;
    }
    __syncthreads();

    // Partial logits of the slice: warp w scores rows w, w + 4, ... four at a time.
    float mv[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) mv[e] = m[lane * 8 + e];
    const T* w = reinterpret_cast<const T*>(p.w_score) + col0 + lane * 8;
    const int nrows = 2 * p.num_heads;
    constexpr int STEP = TILE_THREADS / 32;
    for (int j0 = warp; j0 < nrows; j0 += 4 * STEP) {
        vec8 wv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int j = j0 + u * STEP;
            if (active && j < nrows) wv[u] = *reinterpret_cast<const vec8*>(w + (i64)j * p.d_model);
            else wv[u].w[0] = wv[u].w[1] = wv[u].w[2] = wv[u].w[3] = 0u;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int j = j0 + u * STEP;
            float f[8];
            unpack8<T>(wv[u], f);
            float s = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) s += f[e] * mv[e];
            s = warp_sum(s);
            if (lane == 0 && j < nrows) p.partial_logits[((i64)slice * p.batch.num_slots + slot) * nrows + j] = s;
        }
    }
}

// Labels, margins, logits and the compact ATTN list of head r of sequence n, by
// the whole CTA (NT threads). `scratch` holds NT / 32 + 2 ints.
template <int COMPILE_K, int NT>
__device__ void tile_select_head(const NatslRouterParams& p, int n, int r, u32* hist, int* scratch) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int len = p.batch.cu_seqlens[n + 1] - p.batch.cu_seqlens[n];
    const int nch = (len + NATSL_CHUNK - 1) / NATSL_CHUNK;
    const int ncomplete = len / NATSL_CHUNK;
    const int base = slot_base(p.batch.cu_seqlens, n);
    const int ns = p.batch.num_slots, H = p.num_heads;
    float* margin = p.margins + (i64)r * ns + base;

    int k;
    if (COMPILE_K > 0) k = COMPILE_K;
    else if (p.top_k > 0) k = p.top_k;
    else if (p.top_k < 0) k = (int)ceil((double)p.keep_fraction * (double)ncomplete - 1e-6);  // as reference::keep_fraction_k
    else k = -1;  // argmax
    if (k > ncomplete) k = ncomplete;

    // Pass 1: logits (partials summed in slice order) and margins, 4 chunks per thread in flight.
    const float* __restrict__ partial = p.partial_logits;
    for (int c0 = tid; c0 < nch; c0 += NT * 4) {
        float l0[4], l1[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int c = c0 + NT * u;
            l0[u] = 0.f;
            l1[u] = 0.f;
            if (c < nch) {
                for (int s = 0; s < p.d_split; ++s) {
                    const float* pl = partial + (((i64)s * ns + base + c) * H + r) * 2;
                    l0[u] += __ldcg(pl);
                    l1[u] += __ldcg(pl + 1);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int c = c0 + NT * u;
            if (c < nch) {
                if (p.logits) {
                    p.logits[((i64)(base + c) * H + r) * 2] = l0[u];
                    p.logits[((i64)(base + c) * H + r) * 2 + 1] = l1[u];
                }
                margin[c] = l0[u] - l1[u];
            }
        }
    }
    __syncthreads();  // margins visible to the whole CTA

    // Top-k: the k-th largest key by an MSB-first radix select, 8 bits a pass.
    u32 kth = 0;
    int take_equal = 0;  // how many chunks whose key == kth are kept (lowest indices first)
    if (k > 0) {
        u32 prefix = 0, mask = 0;
        int remaining = k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += NT) hist[b] = 0;
            __syncthreads();
            for (int c = tid; c < ncomplete; c += NT) {
                const u32 key = margin_key(margin[c]);
                if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (warp == 0) {
                // Lane l owns bins 255 - 8l - 7 .. 255 - 8l (descending); scan their counts.
                u32 cnt[8];
                u32 own = 0;
#pragma unroll
                for (int i = 0; i < 8; ++i) { cnt[i] = hist[255 - 8 * lane - i]; own += cnt[i]; }
                u32 incl = own;
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const u32 y = __shfl_up_sync(0xffffffffu, incl, o);
                    if (lane >= o) incl += y;
                }
                const u32 excl = incl - own;
                const bool mine = excl < (u32)remaining && (u32)remaining <= incl;
                const int owner = __ffs(__ballot_sync(0xffffffffu, mine)) - 1;  // >= 0: remaining <= keys under the prefix
                if (lane == owner) {
                    u32 acc = excl;
                    bool found = false;
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        if (!found) {
                            if (acc + cnt[i] >= (u32)remaining) { found = true; scratch[NT / 32] = 255 - 8 * lane - i; scratch[NT / 32 + 1] = (int)acc; }
                            else acc += cnt[i];
                        }
                    }
                }
            }
            __syncthreads();
            const int bin = scratch[NT / 32], before = scratch[NT / 32 + 1];
            __syncthreads();  // scratch[4..5] rewritten by the next pass
            remaining -= before;
            prefix |= (u32)bin << shift;
            mask |= 255u << shift;
        }
        kth = prefix;
        take_equal = remaining;
    }

    // Pass 2: labels and the compact list, in chunk order, NT chunks a step.
    int running = 0, equal_seen = 0;
    for (int c0 = 0; c0 < nch; c0 += NT) {
        const int c = c0 + tid;
        bool attn = false, equal = false;
        if (c < ncomplete) {
            const float mg = margin[c];
            if (k < 0) attn = mg >= 0.f;
            else if (k > 0) {
                const u32 key = margin_key(mg);
                attn = key > kth;
                equal = key == kth;
            }
        }
        int eq_total;
        const int eq_before = block_excl_count<NT>(equal, scratch, &eq_total);
        if (equal) attn = equal_seen + eq_before < take_equal;
        equal_seen += eq_total;
        int attn_total;
        const int attn_before = block_excl_count<NT>(attn, scratch, &attn_total);
        if (c < nch) p.labels[(i64)(base + c) * H + r] = (u8)(c < ncomplete ? (attn ? NATSL_LABEL_ATTN : NATSL_LABEL_GDN) : NATSL_LABEL_PARTIAL);
        if (attn) p.attn_list[(i64)r * ns + base + running + attn_before] = c;
        running += attn_total;
    }
    if (tid == 0) p.attn_count[n * H + r] = running;
}

// Pool + score of one (slot, slice).
template <typename T>
__device__ void router_tile(const NatslRouterParams& p) {
    __shared__ float red[(TILE_THREADS / 32) * TILE_COLS];
    __shared__ float m[TILE_COLS];
    const int slices = p.d_split;
    const int slot = blockIdx.x / slices, slice = blockIdx.x % slices;
    int c;
    const int n = seq_of_slot(p.batch, slot, &c);
    if (n < 0) return;  // a slot in the gap between sequences
    tile_pool_score<T>(p, slot, n, c, slice, red, m);
}

// Select: grid (num_seqs, num_heads), TILE_SELECT_THREADS each:
// at 2048 chunks a pass is 4 steps instead of 16.
constexpr int TILE_SELECT_THREADS = 512;
template <int COMPILE_K>
__device__ void router_tile_select(const NatslRouterParams& p) {
    __shared__ u32 hist[256];
    __shared__ int scratch[TILE_SELECT_THREADS / 32 + 2];
    tile_select_head<COMPILE_K, TILE_SELECT_THREADS>(p, blockIdx.x, blockIdx.y, hist, scratch);
}

} // namespace natsl
