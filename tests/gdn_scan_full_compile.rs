//! NVRTC tier for `ScanTile::Full` / `ScanTile::Staged` (not shipped specs: JIT on first use, so the
//! catalog-wide spill check in tests/nvrtc.rs does not see it): the scan entries of the
//! Full tile compile on both arches with zero spills.

use natsl::jit;
use natsl::ops::gdn::{full_scan_spec, staged_scan_spec};
use natsl_codegen::{catalog, emit, Arch, DType};

#[test]
fn full_scan_tile_compiles_without_spills() {
    if jit::ensure_nvrtc().is_err() {
        eprintln!("skip: NVRTC not available");
        return;
    }
    // Only the plain scan entry: the Full tile does not run context parallelism.
    let mut bad = false;
    // Both knobs measured slower than the defaults (bench/NOTES.md, run f): checked at
    // dk = dv = 128 only, to keep the CPU tier short.
    for arch in [Arch::Sm90a, Arch::Sm80] {
        let mut specs = Vec::new();
        let wide = catalog::gdn_prefill_spec(DType::Bf16, 128, 128, arch);
        specs.push(full_scan_spec(wide, 128));
        specs.push(staged_scan_spec(wide, 128));
        if let Some(n) = catalog::gdn_prefill_narrow_spec(DType::Bf16, 128, 128, arch) {
            specs.push(staged_scan_spec(n, 128));
        }
        specs.retain(|s| !catalog::shipped().contains(s));
        for spec in specs {
            let unit = emit(&spec).unwrap();
            let img = jit::compile_uncached(&unit.name, &unit.source, &jit::options(arch)).unwrap();
            for r in jit::parse_ptxas(&img.log) {
                if r.function.contains("scan") {
                    println!("  {:<76} {:>3} regs spills {}/{}", r.function, r.registers, r.spill_stores, r.spill_loads);
                    if r.function.ends_with("_scan") {
                        bad |= (r.spill_stores, r.spill_loads) != (0, 0);
                    }
                }
            }
        }
    }
    assert!(!bad, "an experimental tile's scan spills");
}
