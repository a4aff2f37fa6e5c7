// Router entry points (see router.cuh): pool + score, then select, as two launches.
// Spec macros come from natsl-codegen.
#include "include/natsl_params.h"
#include "router/router.cuh"
#include "router/tile.cuh"

extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(score)(const NatslRouterParams p) {
    natsl::router_score<NATSL_DTYPE, NATSL_THREADS>(p);
}

// min 1 block: without it ptxas (sm_80) capped this kernel at 32 registers and spilled.
extern "C" __global__ void __launch_bounds__(NATSL_THREADS, 1) NATSL_KERNEL(select)(const NatslRouterParams p) {
    natsl::router_select<NATSL_THREADS, (NATSL_TOPK > 0 ? NATSL_TOPK : 0)>(p);
}

// Tiled router (RouterOptions.pool = Tile, see router/tile.cuh): `tile_score` pools and
// scores, `tile_select` selects.
extern "C" __global__ void __launch_bounds__(natsl::TILE_THREADS, 4) NATSL_KERNEL(tile_score)(const NatslRouterParams p) {
    natsl::router_tile<NATSL_DTYPE>(p);
}

extern "C" __global__ void __launch_bounds__(natsl::TILE_SELECT_THREADS) NATSL_KERNEL(tile_select)(const NatslRouterParams p) {
    natsl::router_tile_select<(NATSL_TOPK > 0 ? NATSL_TOPK : 0)>(p);
}
