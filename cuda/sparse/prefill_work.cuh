// prefill_work.cuh: what one prefill CTA works on, shared by every prefill kernel
// (mma.sync, wgmma, pipelined wgmma): the (query head, sequence, chunk) of the
// CTA and the list of 64-key blocks it visits (see NatslSparsePrefillParams).
#pragma once
#include "common/varlen.cuh"
#include "common/faults.cuh"

namespace natsl {
namespace sparse {

// First position of `list[0..len)` whose entry is >= c (the list is ascending). On any
// list, every entry that exceeds all earlier ones (a running maximum, the entries the
// kernels use) and is < c lies below the result: a running maximum below c has only
// smaller entries before it, and the search ends at a probed entry >= c or at len.
__device__ __forceinline__ int lower_bound_i32(const int* list, int len, int c) {
    int lo = 0, hi = len;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (list[mid] < c) lo = mid + 1; else hi = mid;
    }
    return lo;
}

struct PrefillWork {
    int j, n, c;      // query head, sequence, query chunk
    int seq0, len;    // the sequence's first token and length
    int kvh, mh;      // kv head, mask (routing) head
    int q_rows;       // real query rows of the chunk (<= 64)
    bool routed;      // router lists (else FlexAttention-style block lists)
    const int* list;  // this chunk's block list
    int list_len;     // usable entries of `list`
    int total;        // positions to visit (the own block first when routed)

    // Grid order: (sequence, kv head) slowest, then chunks latest (heaviest) first, then
    // the query heads of one kv head fastest. CTAs that run at the same time then read
    // the same K/V, which stays in L2. (Heads fastest across all sequences made every
    // resident CTA stream a different head's K/V from DRAM: B8 H16 T8192 d128 ran at
    // 3.2 TB/s of DRAM traffic, 66% of peak, ncu 2026-11-28.) False: no work.
    __device__ __forceinline__ bool init(const NatslSparsePrefillParams& p) {
        const int Hq = p.num_q_heads, Hkv = p.num_kv_heads, G = Hq / Hkv;
        const int nch = p.batch.max_chunks;
        int lin = blockIdx.x;
        const int g = lin % G;
        lin /= G;
        c = nch - 1 - lin % nch;
        lin /= nch;
        kvh = lin % Hkv;
        n = lin / Hkv;
        j = kvh * G + g;
        seq0 = p.batch.cu_seqlens[n];
        len = p.batch.cu_seqlens[n + 1] - seq0;
        if (c < 0 || c * 64 >= len) return false;
        mh = j / (Hq / p.num_mask_heads);
        q_rows = min(64, len - c * 64);
        routed = p.mode == NATSL_SPARSE_ROUTED;
        if (routed) {
            list = p.attn_list + (i64)mh * p.batch.num_slots + slot_base(p.batch.cu_seqlens, n);
            // At most the sequence's chunk count (what the list's storage holds): the same
            // list for every chunk, so a skipped entry shifts no later one out of reach.
            const int cnt = min(max(p.attn_count[n * p.num_mask_heads + mh], 0), (len + 63) >> 6);
            list_len = lower_bound_i32(list, cnt, c);
        } else {
            const i64 qb = ((i64)n * p.num_mask_heads + mh) * p.max_q_blocks + c;
            list = p.kv_indices + qb * p.max_kv_blocks;
            list_len = c < p.max_q_blocks ? min(max(p.kv_num_blocks[qb], 0), p.max_kv_blocks) : 0;
        }
        total = list_len + (routed ? 1 : 0);
        return true;
    }
    // The walk over the visit positions: the first position >= it with a valid block
    // (`total` if none), its block in *b. `top` carries the largest list entry examined so
    // far (-1 before the first): an entry is used only if it exceeds top (and is in range:
    // < c routed, <= c block lists); an entry >= 0 that does not (a repeat, or out of
    // order) is skipped and recorded in `faults` (nullable). Walks that examine a
    // position twice pass null the second time.
    __device__ __forceinline__ int next_valid(int it, int& top, int& b, unsigned int* faults) const {
        for (; it < total; ++it) {
            if (routed && it == 0) {  // the own block, first
                b = c;
                return it;
            }
            const int x = list[routed ? it - 1 : it];
            const bool fresh = x > top;  // implies x >= 0
            if (!fresh && x >= 0) report_fault(faults, NATSL_FAULT_LIST_ORDER);
            top = max(top, x);
            if (fresh && x < (routed ? c : c + 1)) {
                b = x;
                return it;
            }
        }
        return it;
    }
};

} // namespace sparse
} // namespace natsl
