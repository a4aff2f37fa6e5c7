//! NVRTC tier for `ScanTile::Reg` (not a shipped spec: JIT on first use, so the
//! catalog-wide spill check in tests/nvrtc.rs does not see it): its scan entries
//! (`scan`, `scan_cp_a`, `scan_cp_c`) compile on both arches and both dtypes with zero
//! spills, for every tile `reg_scan_spec` picks (the n64w4 / n128w8 tiles at dk = 128
//! run the plain scan only: their cp entries are trap stubs, not checked).

use natsl::jit;
use natsl::ops::gdn::reg_scan_spec;
use natsl_codegen::{catalog, emit, Arch, DType};

#[test]
fn reg_scan_tile_compiles_without_spills() {
    if jit::ensure_nvrtc().is_err() {
        eprintln!("skip: NVRTC not available");
        return;
    }
    // By default (CI: 2 cores) the tiles Reg picks by itself, bf16, both arches;
    // NATSL_REG_FULL: also f16 and every RegWith tile the bench and tests force.
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
            for (dk, dv) in [(128u32, 128u32), (128, 256), (64, 64)] {
                // Reg's own choices and the RegWith tiles the bench and tests force.
                let forced = [None, Some((32, 4)), Some((64, 8)), Some((64, 4)), Some((128, 8))];
                for few in [true, false] {
                    for force in forced.into_iter().filter(|f| full || f.is_none()) {
                        let s = reg_scan_spec(catalog::gdn_prefill_spec(dtype, dk, dv, arch), dk as usize, few, force);
                        assert_eq!(s.tile.stages, 3, "reg tile expected for dk {dk}");
                        if !specs.contains(&s) {
                            specs.push(s);
                        }
                    }
                }
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
                // Tiles whose warps hold 128 dk rows: plain scan only (cp entries are stubs).
                let plain_only = spec.dims.dk / (spec.tile.warps / (spec.tile.block_n / 16)) == 128;
                for r in jit::parse_ptxas(&img.log) {
                    if r.function.contains("scan") && !(plain_only && r.function.contains("scan_cp")) {
                        println!("  {:<76} {:>3} regs spills {}/{}", r.function, r.registers, r.spill_stores, r.spill_loads);
                        bad |= (r.spill_stores, r.spill_loads) != (0, 0);
                    }
                }
            }
        }
    }
    assert!(!bad, "the register-state scan spills");
}
