// GDN prefill entry points (see gdn/prefill.cuh). Spec macros come from natsl-codegen.
#include "include/natsl_params.h"
#include "gdn/prefill.cuh"

// W, U, P, F of one (chunk slot, value head): blocked inverse in two smem regions, T in
// registers (PrepKernel::Compact).
extern "C" __global__ void __launch_bounds__(natsl::gdn::PREP_THREADS, (natsl::gdn::prep_compact_min_ctas<NATSL_DK, NATSL_DV>()))
NATSL_KERNEL(prep_compact)(const NatslGdnPrefillParams p) {
    natsl::gdn::prep_compact<NATSL_DTYPE, NATSL_DK, NATSL_DV>(p);
}

// Same outputs as prep_compact; one CTA per (chunk slot, q/k head) serving its
// Hv / Hqk value heads (Q K^T, q/k loads and norms once per group; PrepKernel::Grouped).
extern "C" __global__ void __launch_bounds__(natsl::gdn::PREP_THREADS, (natsl::gdn::prep_grouped_min_ctas<NATSL_DK, NATSL_DV>()))
NATSL_KERNEL(prep_grouped)(const NatslGdnPrefillParams p) {
    natsl::gdn::prep_grouped<NATSL_DTYPE, NATSL_DK, NATSL_DV>(p);
}

extern "C" __global__ void __launch_bounds__(NATSL_THREADS, 1) NATSL_KERNEL(scan)(const NatslGdnPrefillParams p) {
    natsl::gdn::scan<NATSL_DTYPE, NATSL_DK, NATSL_DV, NATSL_BLOCK_N, NATSL_WARPS, NATSL_STAGES>(p);
}

// Context parallelism (ScanParallel in src/ops/gdn.rs; see gdn/prefill.cuh): pass A
// (segment 0 from h0, segment offsets E and transitions A), pass B (segment states),
// pass C (segments >= 1 rerun from their true start states).
extern "C" __global__ void __launch_bounds__(NATSL_THREADS, 1) NATSL_KERNEL(scan_cp_a)(const NatslGdnPrefillParams p) {
    natsl::gdn::scan_cp<NATSL_DTYPE, NATSL_DK, NATSL_DV, NATSL_BLOCK_N, NATSL_WARPS, NATSL_STAGES, natsl::gdn::MODE_CP_A>(p);
}

extern "C" __global__ void __launch_bounds__(natsl::gdn::CP_THREADS) NATSL_KERNEL(cp_combine)(const NatslGdnPrefillParams p) {
    natsl::gdn::cp_combine<NATSL_DK, NATSL_DV>(p);
}

extern "C" __global__ void __launch_bounds__(NATSL_THREADS, 1) NATSL_KERNEL(scan_cp_c)(const NatslGdnPrefillParams p) {
    natsl::gdn::scan_cp<NATSL_DTYPE, NATSL_DK, NATSL_DV, NATSL_BLOCK_N, NATSL_WARPS, NATSL_STAGES, natsl::gdn::MODE_CP_C>(p);
}
