// Router entry point (see router.cuh). Spec macros come from natsl-codegen.
#include "include/natsl_params.h"
#include "router/router.cuh"
#include "router/stream.cuh"

extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(route)(const NatslRouterParams p) {
    natsl::router_fused<NATSL_DTYPE, NATSL_THREADS, (NATSL_TOPK > 0 ? NATSL_TOPK : 0)>(p);
}

extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(score)(const NatslRouterParams p) {
    natsl::router_score<NATSL_DTYPE, NATSL_THREADS>(p);
}

// min 1 block: without it ptxas (sm_80) capped this kernel at 32 registers and spilled.
extern "C" __global__ void __launch_bounds__(NATSL_THREADS, 1) NATSL_KERNEL(select)(const NatslRouterParams p) {
    natsl::router_select<NATSL_THREADS, (NATSL_TOPK > 0 ? NATSL_TOPK : 0)>(p);
}

// Streaming pool (RouterOptions.pool = Streaming, see router/stream.cuh): a persistent
// grid, cp.async ring. `stream_route` selects like `route`; `stream_score` pairs with `select`.
extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(stream_route)(const NatslRouterParams p) {
    natsl::router_stream<NATSL_DTYPE, NATSL_THREADS, (NATSL_TOPK > 0 ? NATSL_TOPK : 0), true>(p);
}

extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(stream_score)(const NatslRouterParams p) {
    natsl::router_stream<NATSL_DTYPE, NATSL_THREADS, 0, false>(p);
}
