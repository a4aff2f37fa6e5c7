// Router entry point (see router.cuh). Spec macros come from natsl-codegen.
#include "include/natsl_params.h"
#include "router/router.cuh"

extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(route)(const NatslRouterParams p) {
    natsl::router_fused<NATSL_DTYPE, NATSL_THREADS, (NATSL_TOPK > 0 ? NATSL_TOPK : 0)>(p);
}
