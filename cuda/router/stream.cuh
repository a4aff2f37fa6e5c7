// stream.cuh: the streaming pool kernel of the router (RouterOptions.pool = Streaming).
//
// Same outputs as router_pool_score (partial_logits [d_split, num_slots, 2 Hr]),
// so both select paths (fused completion counter, split select kernel) are shared.
//
// A persistent grid (about 2 CTAs per SM on the H200, set by occupancy on the
// host) walks work items i = blockIdx.x + k * gridDim.x, item i = (slot i / d_split,
// split i % d_split). An item is cut into tiles of 64 rows x STREAM_COLS columns
// (32 KB in 16-bit types); the CTA's tiles, across item boundaries, go through a
// cp.async (16 B, .cg) ring of STREAM_STAGES stages: while tile q is pooled and
// scored from shared memory, tiles q + 1 .. q + STAGES - 1 are in flight, so
// DRAM never waits for a CTA's reduce / score phases.
//
// Per tile: thread (half, column pair) sums its 32 rows in f32 (u32 smem loads,
// conflict-free), the two halves are added in a fixed order, m_c is rounded like
// the model, and warp w scores rows w, w + 8, ... of W_score over the tile's
// columns (one 16-byte W load per lane, 4 rows in flight), accumulating the
// item's logits in shared memory in tile order. Deterministic; the f32 summation
// order differs from the blocked kernel (logits agree to rounding).
#pragma once
#include "common/dtype.cuh"
#include "common/varlen.cuh"
#include "common/mma_sm80.cuh"
#include "router/router.cuh"

namespace natsl {

constexpr int STREAM_COLS = NATSL_ROUTER_STREAM_COLS;
constexpr int STREAM_STAGES = NATSL_ROUTER_STREAM_STAGES;
constexpr int STREAM_TILE_ELEMS = NATSL_CHUNK * STREAM_COLS;
// Dynamic shared memory: ring [STAGES][64][COLS] (16-bit), then f32 red [2][COLS],
// m [COLS], logit accumulators [2 * MAX_HEADS]. The host computes the same size.
constexpr int STREAM_SMEM_BYTES = STREAM_STAGES * STREAM_TILE_ELEMS * 2 + (3 * STREAM_COLS + 2 * NATSL_ROUTER_MAX_HEADS) * 4;

struct StreamItem {
    int slot, split, n, t0, rows, col0, cols, nsub;  // nsub = 0: a gap slot or past the end
};

__device__ __forceinline__ void stream_item(const NatslRouterParams& p, int k, StreamItem& it) {
    const int i = blockIdx.x + k * gridDim.x;
    it.nsub = 0;
    if (i >= p.batch.num_slots * p.d_split) return;
    it.slot = i / p.d_split;
    it.split = i - it.slot * p.d_split;
    int c = 0;
    it.n = seq_of_slot(p.batch, it.slot, &c);
    if (it.n < 0) return;
    it.t0 = p.batch.cu_seqlens[it.n] + c * NATSL_CHUNK;
    it.rows = min(NATSL_CHUNK, p.batch.cu_seqlens[it.n + 1] - it.t0);
    it.col0 = it.split * p.d_per_split;
    it.cols = min(p.d_per_split, p.d_model - it.col0);
    it.nsub = it.cols > 0 ? (it.cols + STREAM_COLS - 1) / STREAM_COLS : 0;
}

// Items this CTA owns (gap slots included): k < stream_items().
__device__ __forceinline__ int stream_items(const NatslRouterParams& p) {
    const int total = p.batch.num_slots * p.d_split;
    return total > (int)blockIdx.x ? (total - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0;
}

// Cursor over this CTA's tiles: item k, tile sub. Skips gap slots.
struct StreamCursor {
    int k, sub;
    StreamItem it;
};

__device__ __forceinline__ void stream_seek(const NatslRouterParams& p, StreamCursor& cur, int nk) {
    // Move to the first tile at or after (cur.k, cur.sub) that exists.
    while (cur.k < nk) {
        if (cur.sub < cur.it.nsub) return;
        ++cur.k;
        cur.sub = 0;
        if (cur.k < nk) stream_item(p, cur.k, cur.it);
    }
}

__device__ __forceinline__ void stream_begin(const NatslRouterParams& p, StreamCursor& cur, int nk) {
    cur.k = 0;
    cur.sub = 0;
    cur.it.nsub = 0;
    if (nk > 0) stream_item(p, 0, cur.it);
    stream_seek(p, cur, nk);
}

__device__ __forceinline__ void stream_next(const NatslRouterParams& p, StreamCursor& cur, int nk) {
    ++cur.sub;
    stream_seek(p, cur, nk);
}

template <typename T, int THREADS>
__device__ __forceinline__ void stream_issue(const NatslRouterParams& p, const StreamCursor& cur, T* stage) {
    const StreamItem& it = cur.it;
    const int cs = min(STREAM_COLS, it.cols - cur.sub * STREAM_COLS);  // multiple of 8
    const int gpr = cs / 8;
    const T* base = reinterpret_cast<const T*>(p.x) + (i64)it.t0 * p.x_stride_t + it.col0 + cur.sub * STREAM_COLS;
    constexpr int GROUPS = STREAM_COLS / 8;  // 16-byte groups per tile row
    static_assert(STREAM_TILE_ELEMS / 8 % THREADS == 0, "tile groups must split evenly over the threads");
#pragma unroll
    for (int u = 0; u < STREAM_TILE_ELEMS / 8 / THREADS; ++u) {
        const int q = threadIdx.x + u * THREADS;
        const int r = q / GROUPS, g = q % GROUPS;
        if (r < it.rows && g < gpr) cp_async16(stage + r * STREAM_COLS + g * 8, base + (i64)r * p.x_stride_t + g * 8);
    }
}

// Pool + score one tile from shared memory; returns nothing, accumulates lacc.
template <typename T, int THREADS>
__device__ __forceinline__ void stream_consume(const NatslRouterParams& p, const StreamCursor& cur, const T* stage, float* red, float* m, float* lacc) {
    constexpr int PAIRS = STREAM_COLS / 2;
    constexpr int ROW_PAR = THREADS / PAIRS;
    constexpr int ROWS_PER = NATSL_CHUNK / ROW_PAR;
    static_assert(THREADS % PAIRS == 0 && NATSL_CHUNK % ROW_PAR == 0, "pool layout");
    const StreamItem& it = cur.it;
    const int cs = min(STREAM_COLS, it.cols - cur.sub * STREAM_COLS);

    // Pool: thread (part, pair) sums rows part * ROWS_PER .. of columns 2 pair, 2 pair + 1.
    {
        const int pair = threadIdx.x % PAIRS, part = threadIdx.x / PAIRS;
        const int r0 = part * ROWS_PER;
        const int r1 = min(it.rows, r0 + ROWS_PER);
        const u32* col = reinterpret_cast<const u32*>(stage) + pair;  // row stride STREAM_COLS / 2 words
        float a0 = 0.f, a1 = 0.f;
        if (2 * pair < cs) {
#pragma unroll 8
            for (int r = r0; r < r1; ++r) {
                const u32 v = col[r * PAIRS];
                a0 += lo_f32<T>(v);
                a1 += hi_f32<T>(v);
            }
        }
        red[part * STREAM_COLS + 2 * pair] = a0;
        red[part * STREAM_COLS + 2 * pair + 1] = a1;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < STREAM_COLS; e += THREADS) {
        float s = 0.f;
#pragma unroll
        for (int q = 0; q < ROW_PAR; ++q) s += red[q * STREAM_COLS + e];
        float mean = s / (float)it.rows;
        if (p.round_mean) mean = round_to<T>(mean);
        m[e] = e < cs ? mean : 0.f;
    }
    __syncthreads();

    // Score: warp w, rows w, w + WARPS, ...; lane l covers columns 8 l .. 8 l + 7.
    constexpr int WARPS = THREADS / 32;
    constexpr int BATCH = 4;  // W rows in flight per warp
    static_assert(STREAM_COLS == 256, "one 16-byte W group per lane");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int nrows = 2 * p.num_heads;
    const bool active = lane * 8 < cs;
    float mf[8];
    {
        const float4 a = reinterpret_cast<const float4*>(m)[2 * lane];
        const float4 b = reinterpret_cast<const float4*>(m)[2 * lane + 1];
        mf[0] = a.x; mf[1] = a.y; mf[2] = a.z; mf[3] = a.w;
        mf[4] = b.x; mf[5] = b.y; mf[6] = b.z; mf[7] = b.w;
    }
    const T* w = reinterpret_cast<const T*>(p.w_score) + it.col0 + cur.sub * STREAM_COLS + lane * 8;
    for (int j0 = warp; j0 < nrows; j0 += BATCH * WARPS) {
        vec8 v[BATCH];
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
            const int j = j0 + u * WARPS;
            if (active && j < nrows) {
                const uint4 q = __ldg(reinterpret_cast<const uint4*>(w + (i64)j * p.d_model));
                v[u].w[0] = q.x; v[u].w[1] = q.y; v[u].w[2] = q.z; v[u].w[3] = q.w;
            } else {
                v[u].w[0] = v[u].w[1] = v[u].w[2] = v[u].w[3] = 0u;
            }
        }
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
            const int j = j0 + u * WARPS;
            float f[8];
            unpack8<T>(v[u], f);
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) s += f[i] * mf[i];
            s = warp_sum(s);
            if (lane == 0 && j < nrows) lacc[j] = (cur.sub == 0 ? 0.f : lacc[j]) + s;
        }
    }
}

// The streaming pool + score loop. FUSED: after each item, the last CTA of its
// sequence (completion counter) selects, as in router_fused.
template <typename T, int THREADS, int COMPILE_K, bool FUSED>
__device__ void router_stream(const NatslRouterParams& p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* ring = reinterpret_cast<T*>(smem_raw);
    float* red = reinterpret_cast<float*>(smem_raw + STREAM_STAGES * STREAM_TILE_ELEMS * 2);
    float* m = red + 2 * STREAM_COLS;
    float* lacc = m + STREAM_COLS;
    static_assert(THREADS / (STREAM_COLS / 2) <= 2, "red holds two partial rows");
    __shared__ u32 hist[FUSED ? THREADS / 32 : 1][256];
    __shared__ int is_last;

    const int nk = stream_items(p);
    StreamCursor load, use;
    stream_begin(p, load, nk);
    use = load;

    // Prologue: STAGES - 1 tiles in flight (one commit group per tile, empty ones too).
#pragma unroll
    for (int s = 0; s < STREAM_STAGES - 1; ++s) {
        if (load.k < nk) {
            stream_issue<T, THREADS>(p, load, ring + s * STREAM_TILE_ELEMS);
            stream_next(p, load, nk);
        }
        cp_async_commit();
    }

    const int nrows = 2 * p.num_heads;
    for (int q = 0; use.k < nk; ++q) {
        cp_async_wait<STREAM_STAGES - 2>();
        __syncthreads();  // tile q landed for every thread; stage (q - 1) % STAGES is free
        if (load.k < nk) {
            stream_issue<T, THREADS>(p, load, ring + ((q + STREAM_STAGES - 1) % STREAM_STAGES) * STREAM_TILE_ELEMS);
            stream_next(p, load, nk);
        }
        cp_async_commit();

        stream_consume<T, THREADS>(p, use, ring + (q % STREAM_STAGES) * STREAM_TILE_ELEMS, red, m, lacc);

        if (use.sub == use.it.nsub - 1) {
            // Item done: publish its partial logits.
            __syncthreads();
            const int ns = p.batch.num_slots;
            for (int j = threadIdx.x; j < nrows; j += THREADS)
                p.partial_logits[((i64)use.it.split * ns + use.it.slot) * nrows + j] = lacc[j];
            if (FUSED) {
                const int n = use.it.n;
                __threadfence();
                __syncthreads();
                if (threadIdx.x == 0) {
                    const int len = p.batch.cu_seqlens[n + 1] - p.batch.cu_seqlens[n];
                    const int expected = ((len + NATSL_CHUNK - 1) / NATSL_CHUNK) * p.d_split;
                    const int done = atomicAdd(&p.seq_done[n], 1) + 1;
                    is_last = done == expected;
                    if (is_last) p.seq_done[n] = 0;  // ready for the next call
                }
                __syncthreads();
                if (is_last) {
                    __threadfence();
                    const int warp = threadIdx.x / 32;
                    for (int r = warp; r < p.num_heads; r += THREADS / 32) router_select_head<COMPILE_K>(p, n, r, hist[warp]);
                }
                __syncthreads();  // is_last and hist are reused by the next item
            }
        }
        stream_next(p, use, nk);
    }
    cp_async_wait<0>();
}

} // namespace natsl
