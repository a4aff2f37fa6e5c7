// Router entry point (see router.cuh). Spec macros come from natsl-codegen.
#include "include/natsl_params.h"
#include "router/router.cuh"
#include "router/tile.cuh"

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

// Tiled router (RouterOptions.pool = Tile, see router/tile.cuh): `tile_route` pools,
// scores and (its last CTAs per sequence) selects; `tile_score` + `tile_select` split it.
extern "C" __global__ void __launch_bounds__(natsl::TILE_THREADS, 4) NATSL_KERNEL(tile_route)(const NatslRouterParams p) {
    natsl::router_tile<NATSL_DTYPE, (NATSL_TOPK > 0 ? NATSL_TOPK : 0), true>(p);
}

extern "C" __global__ void __launch_bounds__(natsl::TILE_THREADS, 4) NATSL_KERNEL(tile_score)(const NatslRouterParams p) {
    natsl::router_tile<NATSL_DTYPE, 0, false>(p);
}

extern "C" __global__ void __launch_bounds__(natsl::TILE_SELECT_THREADS) NATSL_KERNEL(tile_select)(const NatslRouterParams p) {
    natsl::router_tile_select<(NATSL_TOPK > 0 ? NATSL_TOPK : 0)>(p);
}
