// wgmma.cuh: sm_90a warpgroup MMA (wgmma.mma_async) building blocks: 128B-swizzled
// shared-memory tiles, matrix descriptors, fences, and the instruction wrappers
// (wgmma_ops.cuh, generated: wgmma_rs / wgmma_ss for N = 64, 128, 256).
//
// Tile layout ("sw128"): a [ROWS][D] tile (D a multiple of 64) is stored as D/64
// column panels of [ROWS][64] elements (128-byte rows); within a panel, the
// 16-byte chunk index of row r is XORed with (r & 7). Each panel must start
// 1024-byte aligned. This is wgmma's canonical 128B-swizzle layout both for a
// K-major operand (rows = M or N, columns = K) and for an MN-major B operand
// (rows = K, columns = N), and what a TMA load with CU_TENSOR_MAP_SWIZZLE_128B and
// a 64-element inner box writes.
#pragma once
#include "common/dtype.cuh"

namespace natsl {

#if NATSL_SM90A

// Element offset of (row, col) in a sw128 [ROWS][D] tile.
template <int ROWS> __device__ __forceinline__ int sw128(int row, int col) {
    return (col >> 6) * (ROWS * 64) + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

// Descriptor of a 128B-swizzled operand at shared address `saddr` (bytes).
// SBO = 1024 (8 rows of 128 bytes); LBO = `lbo` bytes (the stride between
// 64-column panels of an MN-major operand wider than 64; unused for K-major and for one panel).
__device__ __forceinline__ unsigned long long wg_desc(u32 saddr, u32 lbo = 16) {
    unsigned long long d = 0;
    d |= (unsigned long long)((saddr & 0x3FFFF) >> 4);
    d |= (unsigned long long)((lbo >> 4) & 0x3FFF) << 16;
    d |= (unsigned long long)(1024 >> 4) << 32;
    d |= 1ull << 62;  // 128-byte swizzle
    return d;
}

// The descriptor of the operand `bytes` past descriptor d's (bytes < 256 KB past a shared
// address below 228 KB: the 14-bit start field never carries). One 32-bit add: building
// each k-step's descriptor with wg_desc cost 7 SASS instructions per wgmma (mask, shift,
// or, the constant high half re-materialised, two R2UR), here 2.
__device__ __forceinline__ unsigned long long wg_desc_add(unsigned long long d, u32 bytes) {
    u32 lo, hi;
    asm("mov.b64 {%0, %1}, %2;" : "=r"(lo), "=r"(hi) : "l"(d));
    lo += bytes >> 4;
    unsigned long long r;
    asm("mov.b64 %0, {%1, %2};" : "=l"(r) : "r"(lo), "r"(hi));
    return r;
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }
// Generic-proxy shared-memory writes (st.shared, cp.async) before async-proxy reads (wgmma, TMA).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

#endif  // NATSL_SM90A

} // namespace natsl

#include "common/wgmma_ops.cuh"
