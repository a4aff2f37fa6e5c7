// Sparse softmax prefill entries (see sparse/prefill.cuh, sparse/prefill_wgmma.cuh,
// sparse/prefill_ws.cuh; PrefillKernel in src/ops/sparse.rs). Spec macros come from
// natsl-codegen. The sm_90a entries exist on every arch so the entry list is the same;
// off sm_90a they are empty stubs the host never launches.
#include "include/natsl_params.h"
#include "sparse/prefill.cuh"
#include "sparse/prefill_wgmma.cuh"
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

// Warp-specialized (FA3 structure): 1 TMA producer + 2 consumer warpgroups, 128 query
// rows, 128-key stages. The params are a __grid_constant__: the TMA reads its tensor maps there.
extern "C" __global__ void __launch_bounds__(384, 1) NATSL_KERNEL(prefill_ws)(const __grid_constant__ NatslSparsePrefillParams p) {
#if NATSL_SM90A
    natsl::sparse::sparse_prefill_ws<NATSL_DTYPE, NATSL_DK, NATSL_DV>(p);
#else
    (void)p;
#endif
}
