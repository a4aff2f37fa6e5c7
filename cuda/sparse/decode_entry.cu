// Sparse softmax decode entries (see sparse/decode.cuh). Spec macros come from natsl-codegen.
#include "include/natsl_params.h"
#include "sparse/decode.cuh"

extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(decode)(const NatslSparseDecodeParams p) {
    natsl::sparse::sparse_decode<NATSL_DTYPE, NATSL_DK, NATSL_DV, NATSL_WARPS, NATSL_STAGES>(p);
}

extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(combine)(const NatslSparseDecodeParams p) {
    natsl::sparse::sparse_decode_combine<NATSL_DTYPE, NATSL_DV, NATSL_THREADS>(p);
}
