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
    for arch in [Arch::Sm90a, Arch::Sm80] {
        let mut specs = Vec::new();
        for (dk, dv) in [(128u32, 128u32), (128, 256), (64, 64)] {
            specs.push(full_scan_spec(catalog::gdn_prefill_spec(DType::Bf16, dk, dv, arch), dk as usize));
        }
        // ScanTile::Staged: every shipped pair, wide and narrow bases (dk = 256 stays 1-stage).
        for (dk, dv) in catalog::GDN_DIMS {
            let wide = catalog::gdn_prefill_spec(DType::Bf16, dk, dv, arch);
            specs.push(staged_scan_spec(wide, dk as usize));
            if let Some(n) = catalog::gdn_prefill_narrow_spec(DType::Bf16, dk, dv, arch) {
                specs.push(staged_scan_spec(n, dk as usize));
            }
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
