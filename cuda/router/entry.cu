// Router entry points (see router/router.cuh): `tile_score` pools and scores,
// `tile_select` selects, as two launches. Spec macros come from natsl-codegen.
#include "include/natsl_params.h"
#include "router/router.cuh"

extern "C" __global__ void __launch_bounds__(natsl::TILE_THREADS, 4) NATSL_KERNEL(tile_score)(const NatslRouterParams p) {
    natsl::router_tile<NATSL_DTYPE>(p);
}

extern "C" __global__ void __launch_bounds__(natsl::TILE_SELECT_THREADS) NATSL_KERNEL(tile_select)(const NatslRouterParams p) {
    natsl::router_tile_select<(NATSL_TOPK > 0 ? NATSL_TOPK : 0)>(p);
}
