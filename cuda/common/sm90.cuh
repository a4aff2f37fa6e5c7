// sm90.cuh: Hopper synchronisation and data-movement primitives shared by the sm_90a
// kernels: mbarriers (with TMA transaction counts), named barriers, register
// reconfiguration (setmaxnreg), and TMA tile loads through a tensor map that lives in
// the kernel's __grid_constant__ parameter block.
#pragma once
#include "common/dtype.cuh"

namespace natsl {

#if NATSL_SM90A

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
// The inits visible to the async proxy (TMA completions) and to the other threads'
// arrivals; call once after the inits, before the CTA barrier that publishes them.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// Wait until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "NATSL_MBAR_WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra NATSL_MBAR_WAIT_%=;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
// Arrive and add `bytes` to the transactions the current phase waits for.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void named_bar_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}

// setmaxnreg: each warpgroup role is one branch of an if/else after a register cap
// at entry (__launch_bounds__(threads, 1)), or ptxas ignores it (warning C7508).
template <int N> __device__ __forceinline__ void reg_dealloc() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(N)); }
template <int N> __device__ __forceinline__ void reg_alloc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(N)); }

// A CUtensorMap (the host encodes it with cuTensorMapEncodeTiled): 128 opaque bytes.
// It must be read from the kernel's parameter space, so kernels that use one take
// their params struct as `const __grid_constant__`.
//
// Load the box at coordinates (c0, c1, c2) (innermost first, in elements; boxes past
// the tensor's extent are zero-filled) into shared address `dst`; the bytes count
// towards the current phase of mbarrier `bar` (see mbar_arrive_expect_tx).
__device__ __forceinline__ void tma_load_3d(u32 dst, const void* tmap, u32 bar, int c0, int c1, int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n"
        :: "r"(dst), "l"(tmap), "r"(bar), "r"(c0), "r"(c1), "r"(c2) : "memory");
}
// Copy `bytes` (a multiple of 16; both addresses 16-byte aligned) of contiguous global
// memory to shared address `dst`, counted towards the current phase of mbarrier `bar`.
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
        :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// Fetch a tensor map into the cache ahead of its first use.
__device__ __forceinline__ void tma_prefetch_desc(const void* tmap) {
    asm volatile("prefetch.tensormap [%0];\n" :: "l"(tmap) : "memory");
}

#endif  // NATSL_SM90A

} // namespace natsl
