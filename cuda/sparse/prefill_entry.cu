// Sparse softmax prefill entries (see sparse/prefill.cuh, sparse/prefill_wgmma.cuh,
// sparse/prefill_wgmma2.cuh, sparse/prefill_ws.cuh; prefill_ws..ws5 = the warp-specialized
// variants, see PrefillKernel in src/ops/sparse.rs). Spec macros come from natsl-codegen. `prefill_wgmma`
// and `prefill_wgmma2` exist on every arch so the
// entry list is the same; off sm_90a it is an empty stub the host never launches.
#include "include/natsl_params.h"
#include "sparse/prefill.cuh"
#include "sparse/prefill_wgmma.cuh"
#include "sparse/prefill_wgmma2.cuh"
#include "sparse/prefill_ws.cuh"

extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(prefill)(const NatslSparsePrefillParams p) {
    natsl::sparse::sparse_prefill<NATSL_DTYPE, NATSL_DK, NATSL_DV, NATSL_WARPS>(p);
}

extern "C" __global__ void __launch_bounds__(128) NATSL_KERNEL(prefill_wgmma)(const NatslSparsePrefillParams p) {
#if NATSL_SM90A
    natsl::sparse::sparse_prefill_wgmma<NATSL_DTYPE, NATSL_DK, NATSL_DV, NATSL_SPARSE_WGMMA_STAGES>(p);
#else
    (void)p;
#endif
}

extern "C" __global__ void __launch_bounds__(128) NATSL_KERNEL(prefill_wgmma2)(const NatslSparsePrefillParams p) {
#if NATSL_SM90A
    natsl::sparse::sparse_prefill_wgmma2<NATSL_DTYPE, NATSL_DK, NATSL_DV>(p);
#else
    (void)p;
#endif
}

// Warp-specialized (FA3 structure): 1 producer + 2 consumer warpgroups, 128 query rows.
extern "C" __global__ void __launch_bounds__(384, 1) NATSL_KERNEL(prefill_ws)(const NatslSparsePrefillParams p) {
#if NATSL_SM90A
    natsl::sparse::sparse_prefill_ws<NATSL_DTYPE, NATSL_DK, NATSL_DV, false>(p);
#else
    (void)p;
#endif
}

// The same with intra-warpgroup pipelining (next QK^T issued with the previous PV).
extern "C" __global__ void __launch_bounds__(384, 1) NATSL_KERNEL(prefill_ws2)(const NatslSparsePrefillParams p) {
#if NATSL_SM90A
    natsl::sparse::sparse_prefill_ws<NATSL_DTYPE, NATSL_DK, NATSL_DV, true>(p);
#else
    (void)p;
#endif
}

// FA3 ping-pong between the two consumers (turns by named barriers, every stage).
extern "C" __global__ void __launch_bounds__(384, 1) NATSL_KERNEL(prefill_ws3)(const NatslSparsePrefillParams p) {
#if NATSL_SM90A
    natsl::sparse::sparse_prefill_ws<NATSL_DTYPE, NATSL_DK, NATSL_DV, false, true>(p);
#else
    (void)p;
#endif
}

// Ping-pong + intra-warpgroup pipelining (FA3's full schedule).
extern "C" __global__ void __launch_bounds__(384, 1) NATSL_KERNEL(prefill_ws4)(const NatslSparsePrefillParams p) {
#if NATSL_SM90A
    natsl::sparse::sparse_prefill_ws<NATSL_DTYPE, NATSL_DK, NATSL_DV, true, true>(p);
#else
    (void)p;
#endif
}

// prefill_ws4 with O += P V as m64n128k16 (dv >= 128; dv 64 is prefill_ws4).
extern "C" __global__ void __launch_bounds__(384, 1) NATSL_KERNEL(prefill_ws5)(const NatslSparsePrefillParams p) {
#if NATSL_SM90A
    natsl::sparse::sparse_prefill_ws<NATSL_DTYPE, NATSL_DK, NATSL_DV, true, true, true>(p);
#else
    (void)p;
#endif
}
