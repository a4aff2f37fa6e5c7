// Router entry points (see router.cuh). Spec macros come from natsl-codegen.
#include "include/natsl_params.h"
#include "router/router.cuh"

extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(score)(const NatslRouterParams p) {
    natsl::router_score<NATSL_DTYPE, NATSL_THREADS>(p);
}

extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(select)(const NatslRouterParams p) {
    natsl::router_select<NATSL_THREADS, (NATSL_TOPK > 0 ? NATSL_TOPK : 0)>(p);
}
