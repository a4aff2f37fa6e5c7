// Sparse softmax prefill entry (see sparse/prefill.cuh). Spec macros come from natsl-codegen.
#include "include/natsl_params.h"
#include "sparse/prefill.cuh"

extern "C" __global__ void __launch_bounds__(NATSL_THREADS) NATSL_KERNEL(prefill)(const NatslSparsePrefillParams p) {
    natsl::sparse::sparse_prefill<NATSL_DTYPE, NATSL_DK, NATSL_DV, NATSL_WARPS>(p);
}
