//! NVRTC tier for the fused sm_90a prefill (`ScanTile::Fused`): its entries (`fused_prep`,
//! `fused_split`, `fused_split_cp_a`, `fused_split_cp_c` and `cp_combine` of the same unit)
//! compile for sm_90a in both dtypes at dk / dv = 128 / 128 and 128 / 256 with zero spills
//! and without the ptxas advisories that undo a warp-specialised wgmma kernel (C7520 /
//! C7512: wgmma serialised, the second for want of registers; C7508: setmaxnreg ignored);
//! the same unit for sm_80 compiles its stubs. NATSL_FUSED_QUICK: bf16 128 / 128 sm_90a
//! only; NATSL_DUMP_DIR: keep each unit's .cu / .cubin (for cuobjdump -sass).

use natsl::jit;
use natsl::ops::gdn::{fused_spec, FUSED_PROFILE_TILE, FUSED_TILE};
use natsl_codegen::{catalog, emit, Arch, DType, KernelSpec};

#[test]
fn fused_prefill_compiles_without_spills_or_serialised_wgmma() {
    if jit::ensure_nvrtc().is_err() {
        eprintln!("skip: NVRTC not available");
        return;
    }
    let quick = std::env::var_os("NATSL_FUSED_QUICK").is_some();
    let dump = std::env::var_os("NATSL_DUMP_DIR");
    let mut failures = Vec::new();
    let mut specs: Vec<KernelSpec> = Vec::new();
    // Profile builds (phase timer): compiled and reported, their spills tolerated (they never
    // ship; the timer's stores may cost the prep a few registers).
    let mut profile: Vec<KernelSpec> = Vec::new();
    for dtype in [DType::Bf16, DType::F16] {
        for (dk, dv) in [(128u32, 128u32), (128, 256)] {
            if quick && (dtype != DType::Bf16 || dv != 128) {
                continue;
            }
            let base = fused_spec(dtype, dk, dv, Arch::Sm90a).expect("fused spec");
            specs.push(base);
            if dtype == DType::Bf16 {
                profile.push(KernelSpec { tile: FUSED_PROFILE_TILE, ..base });
            }
        }
    }
    // The sm_80 unit of the same tile: stubs only (the host refuses the variant there).
    if !quick {
        specs.push(KernelSpec { tile: FUSED_TILE, ..catalog::gdn_prefill_spec(DType::Bf16, 128, 128, Arch::Sm80) });
    }
    let n_strict = specs.len();
    specs.extend(profile);
    assert!(fused_spec(DType::Bf16, 128, 128, Arch::Sm80).is_none() && fused_spec(DType::Bf16, 64, 64, Arch::Sm90a).is_none());
    for (i, spec) in specs.into_iter().enumerate() {
        let strict = i < n_strict;
        let unit = emit(&spec).unwrap();
        for e in ["cp_combine", "fused_prep", "fused_split", "fused_split_cp_a", "fused_split_cp_c"] {
            assert!(unit.entries.iter().any(|x| x == e), "{}: no entry {e}", unit.name);
        }
        // The inline variant (entries fused, fused_cp_a, fused_cp_c) was removed after run o.
        for e in ["fused", "fused_cp_a", "fused_cp_c"] {
            assert!(!unit.entries.iter().any(|x| x == e), "{}: stale entry {e}", unit.name);
        }
        let t0 = std::time::Instant::now();
        let img = match jit::compile_uncached(&unit.name, &unit.source, &jit::options(spec.arch)) {
            Ok(i) => i,
            Err(e) => {
                failures.push(format!("{}: {e}", unit.name));
                continue;
            }
        };
        println!("{} ({:.1} s)", unit.name, t0.elapsed().as_secs_f64());
        if let Some(d) = &dump {
            let d = std::path::Path::new(d);
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join(format!("{}.cu", unit.name)), &unit.source).unwrap();
            std::fs::write(d.join(format!("{}.cubin", unit.name)), &img.cubin).unwrap();
        }
        if std::env::var_os("NATSL_FUSED_LOG").is_some() {
            println!("{}", img.log);
        }
        for code in ["C7520", "C7508", "C7512", "C7515", "instructions are serialized"] {
            for line in img.log.lines().filter(|l| l.contains(code) && strict) {
                failures.push(format!("{}: {}", unit.name, line.trim()));
            }
        }
        for r in jit::parse_ptxas(&img.log) {
            println!("  {:<78} {:>3} regs {:>6} B smem spills {}/{}", r.function, r.registers, r.smem, r.spill_stores, r.spill_loads);
            if (r.spill_stores, r.spill_loads) != (0, 0) && strict {
                failures.push(format!("{}: spills {} B stores / {} B loads", r.function, r.spill_stores, r.spill_loads));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
