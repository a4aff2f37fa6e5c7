// GDN prefill entry points (see gdn/prefill.cuh, gdn/fused.cuh). Spec macros come from natsl-codegen.
// Tile stages >= 4 marks a fused unit (ScanTile::Fused, FusedSplitProfile): there only the fused
// entries and cp_combine have bodies; in every other unit the fused entries are empty stubs
// (as on sm_80), so the entry list is the same everywhere and the host never launches a stub.
// stages = 4 + profile (src/ops/gdn.rs fused_tile): the kernel is 4, its phase-timer build 5.
#if NATSL_STAGES >= 4
#define NATSL_GDN_FUSED_UNIT 1
#define NATSL_GDN_FUSED_PROFILE (NATSL_STAGES - 4)
#else
#define NATSL_GDN_FUSED_UNIT 0
#define NATSL_GDN_FUSED_PROFILE 0
#endif

#include "include/natsl_params.h"
#include "gdn/prefill.cuh"
#include "gdn/fused.cuh"

// W, U, P, F of every value head of one (chunk slot, q/k head): Q K^T, q/k loads and
// norms once per group, the blocked inverse per value head (gdn/prep.cuh).
extern "C" __global__ void __launch_bounds__(natsl::gdn::PREP_THREADS, (natsl::gdn::prep_grouped_min_ctas<NATSL_DK, NATSL_DV>()))
NATSL_KERNEL(prep_grouped)(const NatslGdnPrefillParams p) {
#if NATSL_GDN_FUSED_UNIT
    (void)p;
#else
    natsl::gdn::prep_grouped<NATSL_DTYPE, NATSL_DK, NATSL_DV>(p);
#endif
}

extern "C" __global__ void __launch_bounds__(NATSL_THREADS, 1) NATSL_KERNEL(scan)(const NatslGdnPrefillParams p) {
#if NATSL_GDN_FUSED_UNIT
    (void)p;
#else
    natsl::gdn::scan<NATSL_DTYPE, NATSL_DK, NATSL_DV, NATSL_BLOCK_N, NATSL_WARPS, NATSL_STAGES>(p);
#endif
}

// Context parallelism (ScanParallel in src/ops/gdn.rs; see gdn/prefill.cuh): pass A
// (segment 0 from h0, segment offsets E and transitions A), pass B (segment states),
// pass C (segments >= 1 rerun from their true start states).
extern "C" __global__ void __launch_bounds__(NATSL_THREADS, 1) NATSL_KERNEL(scan_cp_a)(const NatslGdnPrefillParams p) {
#if NATSL_GDN_FUSED_UNIT
    (void)p;
#else
    natsl::gdn::scan_cp<NATSL_DTYPE, NATSL_DK, NATSL_DV, NATSL_BLOCK_N, NATSL_WARPS, NATSL_STAGES, natsl::gdn::MODE_CP_A>(p);
#endif
}

extern "C" __global__ void __launch_bounds__(natsl::gdn::CP_THREADS) NATSL_KERNEL(cp_combine)(const NatslGdnPrefillParams p) {
    natsl::gdn::cp_combine<NATSL_DK, NATSL_DV>(p);
}

extern "C" __global__ void __launch_bounds__(NATSL_THREADS, 1) NATSL_KERNEL(scan_cp_c)(const NatslGdnPrefillParams p) {
#if NATSL_GDN_FUSED_UNIT
    (void)p;
#else
    natsl::gdn::scan_cp<NATSL_DTYPE, NATSL_DK, NATSL_DV, NATSL_BLOCK_N, NATSL_WARPS, NATSL_STAGES, natsl::gdn::MODE_CP_C>(p);
#endif
}

// The fused sm_90a prefill (ScanTile::Fused; gdn/fused.cuh): fused_prep, fully parallel over
// (slot, q/k head), writes the per-chunk records (Tb, P, F) to base.ws_fused; the fused_split*
// entries (384 threads: TMA / record issue, two consumer warpgroups; the plain scan and the
// two context-parallel passes, cp_combine between them) copy them into their stage ring.
// Their params are a __grid_constant__: TMA reads its maps there.
// fused_prep: 5 CTAs per SM (96 registers, no spills; 6 spill): prep_grouped's 4 minus W, U and V.
extern "C" __global__ void __launch_bounds__(natsl::gdn::PREP_THREADS, 5)
NATSL_KERNEL(fused_prep)(const NatslGdnPrefillParams p) {
#if NATSL_SM90A && NATSL_GDN_FUSED_UNIT
    natsl::gdn::prep_grouped<NATSL_DTYPE, NATSL_DK, NATSL_DV, true>(p);
#else
    (void)p;
#endif
}

extern "C" __global__ void __launch_bounds__(384, 1) NATSL_KERNEL(fused_split)(const __grid_constant__ NatslGdnFusedParams p) {
#if NATSL_SM90A && NATSL_GDN_FUSED_UNIT
    natsl::gdn::gdn_fused<NATSL_DTYPE, NATSL_DK, NATSL_DV, natsl::gdn::MODE_SCAN>(p);
#else
    (void)p;
#endif
}

extern "C" __global__ void __launch_bounds__(384, 1) NATSL_KERNEL(fused_split_cp_a)(const __grid_constant__ NatslGdnFusedParams p) {
#if NATSL_SM90A && NATSL_GDN_FUSED_UNIT
    natsl::gdn::gdn_fused<NATSL_DTYPE, NATSL_DK, NATSL_DV, natsl::gdn::MODE_CP_A>(p);
#else
    (void)p;
#endif
}

extern "C" __global__ void __launch_bounds__(384, 1) NATSL_KERNEL(fused_split_cp_c)(const __grid_constant__ NatslGdnFusedParams p) {
#if NATSL_SM90A && NATSL_GDN_FUSED_UNIT
    natsl::gdn::gdn_fused<NATSL_DTYPE, NATSL_DK, NATSL_DV, natsl::gdn::MODE_CP_C>(p);
#else
    (void)p;
#endif
}
