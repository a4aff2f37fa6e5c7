// GDN decode entry point (see gdn/decode.cuh). Spec macros come from natsl-codegen.
#include "include/natsl_params.h"
#include "gdn/decode.cuh"

// 256-thread tiles get a minimum of 2 CTAs per SM (<= 128 registers): without it ptxas
// capped them at 64 and spilled. Smaller tiles keep ptxas' own choice (80 at d128).
#if NATSL_THREADS >= 256
#define NATSL_DECODE_BOUNDS __launch_bounds__(NATSL_THREADS, 2)
#else
#define NATSL_DECODE_BOUNDS __launch_bounds__(NATSL_THREADS)
#endif
extern "C" __global__ void NATSL_DECODE_BOUNDS NATSL_KERNEL(step)(const NatslGdnDecodeParams p) {
    natsl::gdn::decode<NATSL_DTYPE, NATSL_DK, NATSL_DV, NATSL_BLOCK_N, NATSL_WARPS>(p);
}
