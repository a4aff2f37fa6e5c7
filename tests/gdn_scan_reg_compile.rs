//! NVRTC tier for `ScanTile::Reg` (not a shipped spec: JIT on first use, so the
//! catalog-wide spill check in tests/nvrtc.rs does not see it): its scan entries
//! (`scan`, `scan_cp_a`, `scan_cp_c`) compile on both arches and both dtypes with zero
//! spills, at dk 128 with dv 128 and 256 (the n32w4 tile, Auto's few-CTA pick).

use natsl::jit;
use natsl::ops::gdn::reg_scan_spec;
use natsl_codegen::{catalog, emit, Arch, DType};

#[test]
fn reg_scan_tile_compiles_without_spills() {
    if jit::ensure_nvrtc().is_err() {
        eprintln!("skip: NVRTC not available");
        return;
    }
    // By default (CI: 2 cores) bf16, both arches; NATSL_REG_FULL: also f16.
    // NATSL_REG_QUICK: sm90a bf16 only; NATSL_REG_ARCH: that arch only (sm80 / sm90a);
    // NATSL_REG_ONLY: units whose name contains it;
    // NATSL_DUMP_DIR: keep each unit's .cu / .cubin.
    let quick = std::env::var_os("NATSL_REG_QUICK").is_some();
    let full = std::env::var_os("NATSL_REG_FULL").is_some();
    let arch_only = std::env::var("NATSL_REG_ARCH").ok();
    let dump = std::env::var_os("NATSL_DUMP_DIR");
    let mut bad = false;
    for arch in [Arch::Sm90a, Arch::Sm80] {
        for dtype in [DType::Bf16, DType::F16] {
            if (quick && arch != Arch::Sm90a) || (!full && dtype != DType::Bf16) {
                continue;
            }
            if arch_only.as_ref().is_some_and(|a| format!("{arch:?}").to_lowercase() != a.to_lowercase()) {
                continue;
            }
            let mut specs = Vec::new();
            for dv in [128u32, 256] {
                let s = reg_scan_spec(catalog::gdn_prefill_spec(dtype, 128, dv, arch)).unwrap();
                assert_eq!(s.tile.stages, 3, "reg tile expected");
                specs.push(s);
            }
            let only = std::env::var("NATSL_REG_ONLY").ok();
            for spec in specs {
                let unit = emit(&spec).unwrap();
                if only.as_ref().is_some_and(|o| !unit.name.contains(o.as_str())) {
                    continue;
                }
                let img = jit::compile_uncached(&unit.name, &unit.source, &jit::options(arch)).unwrap();
                if let Some(d) = &dump {
                    let d = std::path::Path::new(d);
                    std::fs::write(d.join(format!("{}.cu", unit.name)), &unit.source).unwrap();
                    std::fs::write(d.join(format!("{}.cubin", unit.name)), &img.cubin).unwrap();
                }
                for r in jit::parse_ptxas(&img.log) {
                    if r.function.contains("scan") {
                        println!("  {:<76} {:>3} regs spills {}/{}", r.function, r.registers, r.spill_stores, r.spill_loads);
                        bad |= (r.spill_stores, r.spill_loads) != (0, 0);
                    }
                }
            }
        }
    }
    assert!(!bad, "the register-state scan spills");
}
