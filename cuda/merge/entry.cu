// Merge epilogue entry point (see merge.cuh). Spec macros come from natsl-codegen:
// NATSL_DV is dvs, NATSL_THREADS the CTA size; grid (ceil(T / rows per CTA), Ha).
#include "include/natsl_params.h"
#include "merge/merge.cuh"

extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(merge)(const NatslMergeParams p) {
    natsl::merge_rows<NATSL_DTYPE, NATSL_DV, NATSL_THREADS>(p);
}
