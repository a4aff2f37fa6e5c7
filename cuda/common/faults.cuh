// faults.cuh: the device fault word (NATSL_FAULT_* in natsl_params.h). Bad device-resident
// inputs are treated as documented and recorded here; the atomic runs only on the
// faulting path, so a well-formed call pays one compare per index read.
#pragma once

namespace natsl {

__device__ __forceinline__ void report_fault(unsigned int* faults, unsigned int bit) {
    if (faults) atomicOr(faults, bit);
}

// Row r of a pool of `rows` rows, or -1: for -1 itself (a padded slot) and, recorded as a
// fault, for any other row outside [0, rows).
__device__ __forceinline__ int checked_row(int r, int rows, unsigned int* faults) {
    if (r >= 0 && r < rows) return r;
    if (r != -1) report_fault(faults, NATSL_FAULT_POOL_INDEX);
    return -1;
}

// A chunk label; values other than GDN, ATTN and PARTIAL read as GDN, recorded as a fault.
__device__ __forceinline__ int read_label(const unsigned char* labels, long long i, unsigned int* faults) {
    const int l = labels[i];
    if (l > NATSL_LABEL_PARTIAL) {
        report_fault(faults, NATSL_FAULT_LABEL);
        return NATSL_LABEL_GDN;
    }
    return l;
}

}  // namespace natsl
