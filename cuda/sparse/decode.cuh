// decode.cuh: sparse flash-decoding over a paged KV cache (split-KV), plus the
// combine kernel that merges the splits.
//
// CTA = (sequence, kv head, 16-row tile of the GQA x speculative query rows,
// split). Every KV byte of a (sequence, kv head) is read once per row tile.
// The 4 warps split each 64-key page into 16-key slices (each warp keeps its
// own online-softmax state; merged through smem at the end); pages stream
// through a STAGES-deep cp.async ring so several pages are always in flight.
#pragma once
#include "sparse/flash.cuh"
#include "common/faults.cuh"

namespace natsl {
namespace sparse {

template <int DK, int DV, int STAGES>
struct DecodeSmem {
    static constexpr int STAGE = 64 * (DK + DV) * 2;    // one page: K [64][DK], V [64][DV]
    static constexpr int Q = 0;                         // [16][DK]
    static constexpr int RING = Q + 16 * DK * 2;
    static constexpr int BYTES = RING + STAGES * STAGE;
    // The merge of the warps reuses the ring: O [4][16][DV + 8] f32, m and l [4][16].
    static constexpr int OPAD = DV + 8;
    static constexpr int MERGE_O = RING;
    static constexpr int MERGE_M = MERGE_O + 4 * 16 * OPAD * 4;
    static constexpr int MERGE_L = MERGE_M + 4 * 16 * 4;
    static_assert(MERGE_L + 4 * 16 * 4 <= BYTES, "merge buffers fit in the ring");
};

template <typename T, int DK, int DV, int WARPS, int STAGES>
__device__ void sparse_decode(const NatslSparseDecodeParams& p) {
    static_assert(WARPS == 4, "4 warps x 16 keys = one page");
    static_assert(STAGES >= 2, "ring of at least 2 pages");
    constexpr int THREADS = WARPS * 32;
    constexpr bool Q_REGS = DK <= 128;
    using S = DecodeSmem<DK, DV, STAGES>;
    extern __shared__ __align__(128) unsigned char smem[];
    T* sq = reinterpret_cast<T*>(smem + S::Q);
    auto stage_k = [&](int s) { return reinterpret_cast<T*>(smem + S::RING + s * S::STAGE); };
    auto stage_v = [&](int s) { return reinterpret_cast<T*>(smem + S::RING + s * S::STAGE + 64 * DK * 2); };

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int lin = blockIdx.x;
    const int split = lin % p.num_splits;
    lin /= p.num_splits;
    const int mt = lin % p.row_tiles;
    lin /= p.row_tiles;
    const int kvh = lin % p.num_kv_heads;
    const int n = lin / p.num_kv_heads;
    if (n >= p.num_seqs) return;
    const int G = p.num_q_heads / p.num_kv_heads;
    const int nq = p.num_queries;
    const int R = G * nq;  // rows: query m, GQA head g at row m * G + g
    const int th = kvh / (p.num_kv_heads / p.num_table_heads);

    const int cnt_raw = p.page_count[n * p.num_table_heads + th];
    const int len_raw = p.cur_len[n];
    const int cnt = min(max(cnt_raw, 0), p.max_pages);
    const int cur_len = min(max(len_raw, 0), 64);
    const int cur_page = p.cur_page[n];
    if (mt == 0) {
        // Faults, from the first row tile of each (kv head, split), in a pass of its own:
        // the pointer live across the page loop cost the sm_80 64/64 unit 4 bytes of spills.
        if (tid == 0 && (cnt != cnt_raw || cur_len != len_raw)) report_fault(p.faults, NATSL_FAULT_PAGE_LEN);
        for (int e = split * p.pages_per_split + tid; e < min((split + 1) * p.pages_per_split, cnt + 1); e += THREADS) {
            const int id = e < cnt ? p.page_table[((i64)n * p.num_table_heads + th) * p.max_pages + e] : cur_page;
            if ((id < 0 || id >= p.num_pages) && id != -1) report_fault(p.faults, NATSL_FAULT_PAGE_ID);
        }
    }
    const int* table = p.page_table + ((i64)n * p.num_table_heads + th) * p.max_pages;
    const int e0 = split * p.pages_per_split;
    const int e1 = min(e0 + p.pages_per_split, cnt + 1);  // entry cnt = the current page

    // Q rows of this tile.
    const T* qbase = reinterpret_cast<const T*>(p.q);
    for (int i = tid; i < 16 * (DK / 8); i += THREADS) {
        const int r = i / (DK / 8), col = (i % (DK / 8)) * 8;
        const int rho = mt * 16 + r;
        const bool ok = rho < R;
        const int mq = ok ? rho / G : 0, g = ok ? rho % G : 0;
        const T* src = qbase + (i64)(n * nq + mq) * p.q_stride_t + (i64)(kvh * G + g) * p.q_stride_h + col;
        cp_async16(sq + swz<DK>(r, col), ok ? src : qbase, ok ? 16 : 0);
    }
    cp_async_commit();

    const T* kpool = reinterpret_cast<const T*>(p.k_pages) + (i64)kvh * p.k_stride_h;
    const T* vpool = reinterpret_cast<const T*>(p.v_pages) + (i64)kvh * p.v_stride_h;
    // Page id and valid rows of list entry e (rows 0: skip the page).
    auto entry = [&](int e, int* rows) -> int {
        const int id = e < cnt ? table[e] : cur_page;
        const bool ok = id >= 0 && id < p.num_pages;
        *rows = ok ? (e < cnt ? 64 : cur_len) : 0;
        return ok ? id : 0;
    };
    auto load_page = [&](int e, int s) {
        int rows;
        const int id = entry(e, &rows);
        load_tile<T, DK, 64, THREADS>(stage_k(s), kpool + (i64)id * p.k_stride_page, p.k_stride_t, rows, tid);
        load_tile<T, DV, 64, THREADS>(stage_v(s), vpool + (i64)id * p.v_stride_page, p.v_stride_t, rows, tid);
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (e0 + s < e1) load_page(e0 + s, s);
        cp_async_commit();
    }

    const T* wq = reinterpret_cast<const T*>(p.q_norm_w);
    const T* wk = reinterpret_cast<const T*>(p.k_norm_w);
    cp_async_wait<STAGES - 1>();  // the Q group
    __syncthreads();
    if (wq || wk) {
        fold_q_norm<T, DK, 16, THREADS>(sq, wq, wk, p.norm_eps, tid);
        __syncthreads();
    }
    u32 qa[Q_REGS ? DK / 16 : 1][4];
    if (Q_REGS) load_q_frags<T, DK>(qa, sq, 0, lane);

    float o[DV / 8][4];
#pragma unroll
    for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};
    // Position of each of the thread's two rows in the current page (keys <= pos visible).
    int pos[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int rho = mt * 16 + (lane >> 2) + 8 * r;
        pos[r] = cur_len - nq + min(rho, R - 1) / G;
    }

    for (int e = e0; e < e1; ++e) {
        const int s = (e - e0) % STAGES;
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // page e has landed; every warp is done with page e - 1
        if (e + STAGES - 1 < e1) load_page(e + STAGES - 1, (e - e0 + STAGES - 1) % STAGES);
        cp_async_commit();
        int rows;
        entry(e, &rows);
        if (rows == 0) continue;  // invalid page id: nothing to see
        const T* kt = stage_k(s);
        const T* vt = stage_v(s);
        float sc[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
        qk_tile<T, DK, 2, Q_REGS>(sc, qa, sq, 0, kt, warp * 16, lane);
        float ks[2][2] = {{1.f, 1.f}, {1.f, 1.f}};
        if (wk) {
            // This warp's 16 keys: 2 lanes per key row.
            int r;
            const float ss = row_sumsq<T, DK, 16, 32>(kt + warp * 16 * DK, lane, &r);
            // row_sumsq indexes rows 0..15 of the slice; the swizzle depends on
            // row & 7, which is unchanged by the 16-row offset.
            const float inv = rsqrtf(ss / (float)DK + p.norm_eps);
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int key = nt * 8 + 2 * (lane & 3) + h;  // owned by lanes 2 key, 2 key + 1
                    ks[nt][h] = __shfl_sync(0xffffffffu, inv, 2 * key);
                }
            }
        }
        const bool is_cur = e == cnt;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int key = warp * 16 + nt * 8 + 2 * (lane & 3) + (q & 1);
                float x = sc[nt][q] * ks[nt][q & 1] * p.scale_log2;
                if (key >= rows || (is_cur && key > pos[q >> 1])) x = neg_inf();
                sc[nt][q] = x;
            }
        }
        online_softmax<2, DV / 8>(sc, o, m, l);
        pv_tile<T, DV, 1>(o, sc, vt, warp * 16, lane);
    }
    cp_async_wait<0>();
    __syncthreads();

    // Merge the 4 warps' states through smem.
    float* mo = reinterpret_cast<float*>(smem + S::MERGE_O);
    float* mm = reinterpret_cast<float*>(smem + S::MERGE_M);
    float* ml = reinterpret_cast<float*>(smem + S::MERGE_L);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    const int ra = lane >> 2;
    if ((lane & 3) == 0) {
        mm[warp * 16 + ra] = m[0];
        mm[warp * 16 + ra + 8] = m[1];
        ml[warp * 16 + ra] = l[0];
        ml[warp * 16 + ra + 8] = l[1];
    }
#pragma unroll
    for (int ot = 0; ot < DV / 8; ++ot) {
        const int col = ot * 8 + 2 * (lane & 3);
        *reinterpret_cast<float2*>(mo + (warp * 16 + ra) * S::OPAD + col) = make_float2(o[ot][0], o[ot][1]);
        *reinterpret_cast<float2*>(mo + (warp * 16 + ra + 8) * S::OPAD + col) = make_float2(o[ot][2], o[ot][3]);
    }
    __syncthreads();

    const bool direct = p.num_splits == 1;
    for (int i = tid; i < 16 * (DV / 8); i += THREADS) {
        const int r = i / (DV / 8), col = (i % (DV / 8)) * 8;
        const int rho = mt * 16 + r;
        if (rho >= R) continue;
        float M = neg_inf();
#pragma unroll
        for (int w = 0; w < 4; ++w) M = fmaxf(M, mm[w * 16 + r]);
        const float M_use = M == neg_inf() ? 0.f : M;
        float L = 0.f, acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const float sc = fast_exp2(mm[w * 16 + r] - M_use);
            L += ml[w * 16 + r] * sc;
            const float* src = mo + (w * 16 + r) * S::OPAD + col;
#pragma unroll
            for (int k = 0; k < 8; ++k) acc[k] += src[k] * sc;
        }
        const float inv = L > 0.f ? 1.f / L : 0.f;
        const float lse2 = L > 0.f ? M + __log2f(L) : neg_inf();  // log2 units
        const int row = n * nq + rho / G, head = kvh * G + rho % G;
        if (direct) {
            vec8 v;
#pragma unroll
            for (int k = 0; k < 4; ++k) v.w[k] = pack2<T>(acc[2 * k] * inv, acc[2 * k + 1] * inv);
            *reinterpret_cast<vec8*>(reinterpret_cast<T*>(p.o) + (i64)row * p.o_stride_t + (i64)head * p.o_stride_h + col) = v;
            if (p.lse && col == 0) p.lse[(i64)row * p.lse_stride_t + head] = lse2 == neg_inf() ? neg_inf() : lse2 * kLn2;
        } else {
            const i64 prow = ((i64)split * p.num_seqs * nq + row) * p.num_q_heads + head;
            float4* dst = reinterpret_cast<float4*>(p.part_o + prow * DV + col);
            dst[0] = make_float4(acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv);
            dst[1] = make_float4(acc[4] * inv, acc[5] * inv, acc[6] * inv, acc[7] * inv);
            if (col == 0) p.part_lse[prow] = lse2;
        }
    }
}

// Merge the splits of one (query row, head): grid N * nq * Hq, THREADS threads.
template <typename T, int DV, int THREADS>
__device__ void sparse_decode_combine(const NatslSparseDecodeParams& p) {
    const int Hq = p.num_q_heads;
    const int rows = p.num_seqs * p.num_queries;
    const int row = blockIdx.x / Hq, head = blockIdx.x % Hq;
    if (row >= rows) return;
    const i64 stride = (i64)rows * Hq;  // between splits
    const i64 base = (i64)row * Hq + head;
    float M = neg_inf();
    for (int s = 0; s < p.num_splits; ++s) M = fmaxf(M, p.part_lse[s * stride + base]);
    const float M_use = M == neg_inf() ? 0.f : M;
    float W = 0.f;
    for (int s = 0; s < p.num_splits; ++s) W += fast_exp2(p.part_lse[s * stride + base] - M_use);
    const float inv = W > 0.f ? 1.f / W : 0.f;
    T* out = reinterpret_cast<T*>(p.o) + (i64)row * p.o_stride_t + (i64)head * p.o_stride_h;
    for (int col = threadIdx.x; col < DV; col += THREADS) {
        float acc = 0.f;
        for (int s = 0; s < p.num_splits; ++s) {
            const float w = fast_exp2(p.part_lse[s * stride + base] - M_use);
            if (w > 0.f) acc += w * p.part_o[(s * stride + base) * DV + col];
        }
        out[col] = from_f32<T>(acc * inv);
    }
    if (p.lse && threadIdx.x == 0) p.lse[(i64)row * p.lse_stride_t + head] = W > 0.f ? (M + __log2f(W)) * kLn2 : neg_inf();
}

} // namespace sparse
} // namespace natsl
