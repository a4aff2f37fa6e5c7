// GDN decode entry point (see gdn/decode.cuh). Spec macros come from natsl-codegen.
#include "include/natsl_params.h"
#include "gdn/decode.cuh"

extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(step)(const NatslGdnDecodeParams p) {
    natsl::gdn::decode<NATSL_DTYPE, NATSL_DK, NATSL_DV, NATSL_BLOCK_N, NATSL_WARPS>(p);
}
