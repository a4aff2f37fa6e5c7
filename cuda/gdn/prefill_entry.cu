// GDN prefill entry points (see gdn/prefill.cuh). Spec macros come from natsl-codegen.
#include "include/natsl_params.h"
#include "gdn/prefill.cuh"

extern "C" __global__ void __launch_bounds__(natsl::gdn::PREP_THREADS) NATSL_KERNEL(prep)(const NatslGdnPrefillParams p) {
    natsl::gdn::prep<NATSL_DTYPE, NATSL_DK, NATSL_DV, false>(p);
}

// Same outputs as prep; T = (I + A)^{-1} blockwise on the tensor cores (PrepKernel::Blocked).
extern "C" __global__ void __launch_bounds__(natsl::gdn::PREP_THREADS) NATSL_KERNEL(prep_blocked)(const NatslGdnPrefillParams p) {
    natsl::gdn::prep<NATSL_DTYPE, NATSL_DK, NATSL_DV, true>(p);
}

extern "C" __global__ void __launch_bounds__(NATSL_THREADS, 1) NATSL_KERNEL(scan)(const NatslGdnPrefillParams p) {
    natsl::gdn::scan<NATSL_DTYPE, NATSL_DK, NATSL_DV, NATSL_BLOCK_N, NATSL_WARPS, NATSL_STAGES>(p);
}
