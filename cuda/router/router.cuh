// router.cuh: the router of SPEC.md section 3 (blocked pool), two launches.
//
// Score: grid (num_slots, d_split). Each CTA mean-pools one chunk over a slice of D
// (16-byte loads, f32 sums), rounds m_c like the model, and writes the slice's
// partial logits for every routing head. Splitting D keeps the GPU full when
// there are few chunks; partials (not atomics) keep the sums deterministic.
// Select: one warp per (sequence, routing head) sums the partials in a fixed order,
// labels the chunks (argmax, or top-k by an MSB-first radix select over the
// margins) and writes the compact ATTN list. (A fused launch in which the last CTA
// of a sequence selected was removed with the tiled one: see src/ops/router.rs.)
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

template <typename T, int THREADS>
__device__ __forceinline__ void router_pool_score(const NatslRouterParams& p, int slot, int n, int c, float* smem_f) {
    const int split = blockIdx.y;
    const int t0 = p.batch.cu_seqlens[n] + c * NATSL_CHUNK;
    const int rows = min(NATSL_CHUNK, p.batch.cu_seqlens[n + 1] - t0);
    const int col0 = split * p.d_per_split;
    const int cols = min(p.d_per_split, p.d_model - col0);  // multiple of 8
    const int groups = cols / 8;                            // 16-byte column groups, <= THREADS (host)
    const int row_par = THREADS / groups;                   // token rows pooled in parallel

    // Pool: thread (r0, g) sums rows r0, r0 + row_par, ... of column group g.
    const T* x = reinterpret_cast<const T*>(p.x);
    const int g = threadIdx.x % groups, r0 = threadIdx.x / groups;
    float* m = smem_f + THREADS * 8;  // m_c slice [cols]
    if (r0 < row_par) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const T* base = x + (i64)t0 * p.x_stride_t + col0 + g * 8;
#pragma unroll 8
        for (int r = r0; r < rows; r += row_par) {
            vec8 v = *reinterpret_cast<const vec8*>(base + (i64)r * p.x_stride_t);
            float f[8];
            unpack8<T>(v, f);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] += f[i];
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) smem_f[threadIdx.x * 8 + i] = acc[i];
    }
    __syncthreads();
    // Reduce the row_par partials in a fixed order, then round like the model.
    for (int e = threadIdx.x; e < cols; e += THREADS) {
        const int gg = e / 8, i = e % 8;
        float s = 0.f;
        for (int r = 0; r < row_par; ++r) s += smem_f[(r * groups + gg) * 8 + i];
        float mean = s / (float)rows;
        if (p.round_mean) mean = round_to<T>(mean);
        m[e] = mean;
    }
    __syncthreads();

    // Score: warp w computes rows w, w + warps, ... of W_score over this D slice.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const T* w = reinterpret_cast<const T*>(p.w_score);
    const int nrows = 2 * p.num_heads;
    for (int j = warp; j < nrows; j += THREADS / 32) {
        const T* wr = w + (i64)j * p.d_model + col0;
        float s = 0.f;
        for (int gg = lane; gg < groups; gg += 32) {
            vec8 v = *reinterpret_cast<const vec8*>(wr + gg * 8);
            float f[8];
            unpack8<T>(v, f);
#pragma unroll
            for (int i = 0; i < 8; ++i) s += f[i] * m[gg * 8 + i];
        }
        s = warp_sum(s);
        if (lane == 0) p.partial_logits[((i64)split * p.batch.num_slots + slot) * nrows + j] = s;
    }
}

// One warp labels every chunk of sequence n for routing head r and writes its list.
template <int COMPILE_K>
__device__ void router_select_head(const NatslRouterParams& p, int n, int r, u32* hist) {
    const int lane = threadIdx.x % 32;
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

    // Pass 1: logits from the partials (fixed split order), margins. Loads for
    // four chunks are issued before any store, so a lane has 4 L2 round trips in flight.
    const float* __restrict__ partial = p.partial_logits;
    for (int c0 = lane; c0 < nch; c0 += 32 * 4) {
        float l0[4], l1[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int c = c0 + 32 * u;
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
            const int c = c0 + 32 * u;
            if (c < nch) {
                if (p.logits) {
                    p.logits[((i64)(base + c) * H + r) * 2] = l0[u];
                    p.logits[((i64)(base + c) * H + r) * 2 + 1] = l1[u];
                }
                margin[c] = l0[u] - l1[u];
            }
        }
    }
    __syncwarp();

    // Top-k: the k-th largest key by an MSB-first radix select, 8 bits a pass.
    u32 kth = 0;
    int take_equal = 0;  // how many chunks whose key == kth are kept (lowest indices first)
    if (k > 0) {
        u32 prefix = 0, mask = 0;
        int remaining = k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = lane; b < 256; b += 32) hist[b] = 0;
            __syncwarp();
            for (int c = lane; c < ncomplete; c += 32) {
                const u32 key = margin_key(margin[c]);
                if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
            }
            __syncwarp();
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
            const int owner = __ffs(__ballot_sync(0xffffffffu, mine)) - 1;  // uniform
            if (owner < 0) break;  // unreachable: remaining <= keys under the prefix
            int bin = 0, before = 0;
            if (lane == owner) {
                u32 acc = excl;
                bool found = false;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    if (!found) {
                        if (acc + cnt[i] >= (u32)remaining) { found = true; bin = 255 - 8 * lane - i; before = (int)acc; }
                        else acc += cnt[i];
                    }
                }
            }
            bin = __shfl_sync(0xffffffffu, bin, owner);
            before = __shfl_sync(0xffffffffu, before, owner);
            remaining -= before;
            prefix |= (u32)bin << shift;
            mask |= 255u << shift;
            __syncwarp();
        }
        kth = prefix;
        take_equal = remaining;
    }

    // Pass 2: labels and the compact list, in chunk order.
    int running = 0, equal_seen = 0;
    for (int c0 = 0; c0 < nch; c0 += 32) {
        const int c = c0 + lane;
        int label = NATSL_LABEL_GDN;
        bool attn = false, equal = false;
        if (c < ncomplete) {
            const float m = margin[c];
            if (k < 0) attn = m >= 0.f;
            else if (k > 0) {
                const u32 key = margin_key(m);
                attn = key > kth;
                equal = key == kth;
            }
        }
        const u32 eq_ballot = __ballot_sync(0xffffffffu, equal);
        if (equal) attn = equal_seen + __popc(eq_ballot & lanemask_lt()) < take_equal;
        equal_seen += __popc(eq_ballot);
        if (c < ncomplete) label = attn ? NATSL_LABEL_ATTN : NATSL_LABEL_GDN;
        else if (c < nch) label = NATSL_LABEL_PARTIAL;
        if (c < nch) p.labels[(i64)(base + c) * H + r] = (u8)label;
        const u32 ballot = __ballot_sync(0xffffffffu, attn);
        if (attn) p.attn_list[(i64)r * ns + base + running + __popc(ballot & lanemask_lt())] = c;
        running += __popc(ballot);
    }
    if (lane == 0) p.attn_count[n * H + r] = running;
}

// Pool + score: the select kernel runs next on the stream.
template <typename T, int THREADS>
__device__ void router_score(const NatslRouterParams& p) {
    extern __shared__ float smem_f[];
    const int slot = blockIdx.x;
    int c;
    const int n = seq_of_slot(p.batch, slot, &c);
    if (n < 0) return;
    router_pool_score<T, THREADS>(p, slot, n, c, smem_f);
}

// Select: grid (num_seqs, ceil(num_heads / warps)), one warp per head.
template <int THREADS, int COMPILE_K>
__device__ void router_select(const NatslRouterParams& p) {
    __shared__ u32 hist[THREADS / 32][256];
    const int warp = threadIdx.x / 32;
    const int r = blockIdx.y * (THREADS / 32) + warp;
    if (r < p.num_heads) router_select_head<COMPILE_K>(p, blockIdx.x, r, hist[warp]);
}

} // namespace natsl
