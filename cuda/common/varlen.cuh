// varlen.cuh: packed-batch bookkeeping shared by every family (see NatslVarlen).
#pragma once

namespace natsl {

__device__ __forceinline__ int slot_base(const int* cu_seqlens, int n) { return cu_seqlens[n] / NATSL_CHUNK + n; }

// The sequence that owns chunk slot `slot`, or -1 for a slot in the gap between
// sequences. Binary search over cu_seqlens (N is small; the loads hit L1).
__device__ __forceinline__ int seq_of_slot(const NatslVarlen& b, int slot, int* chunk) {
    int lo = 0, hi = b.num_seqs - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (slot_base(b.cu_seqlens, mid) <= slot) lo = mid; else hi = mid - 1;
    }
    int len = b.cu_seqlens[lo + 1] - b.cu_seqlens[lo];
    int c = slot - slot_base(b.cu_seqlens, lo);
    if (c < 0 || c * NATSL_CHUNK >= len) return -1;
    *chunk = c;
    return lo;
}

} // namespace natsl
