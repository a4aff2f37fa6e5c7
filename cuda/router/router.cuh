// router.cuh: the fused router of SPEC.md section 3.
//
//   score:  grid (num_slots, d_split). One CTA mean-pools one chunk over a slice
//           of D (16-byte loads, f32 sums), rounds m_c like the model, and writes
//           the slice's partial logits for every routing head. Splitting D keeps
//           the GPU full when there are few chunks; partials (not atomics) keep
//           the result deterministic.
//   select: grid (num_seqs, num_heads). Sums the partials in a fixed order,
//           applies argmax or top-k, and writes labels and the compact ATTN list.
#pragma once
#include "common/dtype.cuh"
#include "common/varlen.cuh"

namespace natsl {

template <typename T, int THREADS>
__device__ void router_score(const NatslRouterParams& p) {
    extern __shared__ float smem_f[];  // [THREADS * 8] partial sums, then m_c slice
    const int slot = blockIdx.x, split = blockIdx.y;
    int c;
    const int n = seq_of_slot(p.batch, slot, &c);
    if (n < 0) return;
    const int t0 = p.batch.cu_seqlens[n] + c * NATSL_CHUNK;
    const int rows = min(NATSL_CHUNK, p.batch.cu_seqlens[n + 1] - t0);
    const int col0 = split * p.d_per_split;
    const int cols = min(p.d_per_split, p.d_model - col0);  // multiple of 8
    const int groups = cols / 8;                            // 16-byte column groups
    const int row_par = THREADS / groups;                   // token rows pooled in parallel

    // Pool: thread (r, g) sums tokens r, r + row_par, ... of column group g.
    // The host keeps groups <= THREADS (d_per_split <= 8 * THREADS).
    const T* x = reinterpret_cast<const T*>(p.x);
    const int g = threadIdx.x % groups, r0 = threadIdx.x / groups;
    float* m = smem_f + THREADS * 8;  // m_c slice [cols]
    if (r0 < row_par) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const T* base = x + (i64)t0 * p.x_stride_t + col0 + g * 8;
#pragma unroll 4
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
        for (int g = lane; g < groups; g += 32) {
            vec8 v = *reinterpret_cast<const vec8*>(wr + g * 8);
            float f[8];
            unpack8<T>(v, f);
#pragma unroll
            for (int i = 0; i < 8; ++i) s += f[i] * m[g * 8 + i];
        }
        s = warp_sum(s);
        if (lane == 0) p.partial_logits[((i64)split * p.batch.num_slots + slot) * nrows + j] = s;
    }
}

// Top-k rank of chunk c among the complete chunks: how many beat it (larger
// margin, or equal margin and lower index). ATTN iff rank < k.
__device__ __forceinline__ int margin_rank(const float* margin, int ncomplete, int c) {
    const float mc = margin[c];
    int rank = 0;
    for (int o = 0; o < ncomplete; ++o) {
        const float mo = margin[o];
        rank += (mo > mc) || (mo == mc && o < c);
    }
    return rank;
}

template <int THREADS, int COMPILE_K>
__device__ void router_select(const NatslRouterParams& p) {
    extern __shared__ float margin[];  // [max_chunks]
    __shared__ int warp_tot[THREADS / 32];
    __shared__ int running;
    const int n = blockIdx.x, r = blockIdx.y;
    const int len = p.batch.cu_seqlens[n + 1] - p.batch.cu_seqlens[n];
    const int nch = (len + NATSL_CHUNK - 1) / NATSL_CHUNK;
    const int ncomplete = len / NATSL_CHUNK;
    const int base = slot_base(p.batch.cu_seqlens, n);
    const int ns = p.batch.num_slots, H = p.num_heads;

    for (int c = threadIdx.x; c < nch; c += THREADS) {
        float l0 = 0.f, l1 = 0.f;
        for (int s = 0; s < p.d_split; ++s) {
            const float* pl = p.partial_logits + (((i64)s * ns + base + c) * H + r) * 2;
            l0 += pl[0];
            l1 += pl[1];
        }
        if (p.logits) {
            p.logits[((i64)(base + c) * H + r) * 2] = l0;
            p.logits[((i64)(base + c) * H + r) * 2 + 1] = l1;
        }
        margin[c] = l0 - l1;
    }
    __syncthreads();

    int k;
    if (COMPILE_K > 0) k = COMPILE_K;
    else if (p.top_k > 0) k = p.top_k;
    else if (p.top_k < 0) k = (int)ceil((double)p.keep_fraction * (double)ncomplete - 1e-6);  // as reference::keep_fraction_k
    else k = -1;  // argmax
    if (k > ncomplete) k = ncomplete;

    if (threadIdx.x == 0) running = 0;
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int c0 = 0; c0 < nch; c0 += THREADS) {
        const int c = c0 + threadIdx.x;
        int label = NATSL_LABEL_GDN;
        if (c < ncomplete) {
            const bool attn = k < 0 ? margin[c] >= 0.f : margin_rank(margin, ncomplete, c) < k;
            label = attn ? NATSL_LABEL_ATTN : NATSL_LABEL_GDN;
        } else if (c < nch) {
            label = NATSL_LABEL_PARTIAL;
        }
        if (c < nch) p.labels[(i64)(base + c) * H + r] = (u8)label;
        // Block-wide exclusive scan of the ATTN flags, in chunk order.
        const int flag = label == NATSL_LABEL_ATTN;
        const unsigned ballot = __ballot_sync(0xffffffffu, flag);
        if (lane == 0) warp_tot[warp] = __popc(ballot);
        __syncthreads();
        int before = running;
        for (int w = 0; w < warp; ++w) before += warp_tot[w];
        before += __popc(ballot & ((1u << lane) - 1u));
        if (flag) p.attn_list[(i64)r * ns + base + before] = c;
        __syncthreads();
        if (threadIdx.x == THREADS - 1) running = before + flag;
        __syncthreads();
    }
    if (threadIdx.x == 0) p.attn_count[n * H + r] = running;
}

} // namespace natsl
