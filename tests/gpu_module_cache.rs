//! Tier 3: while one unit compiles, calls that use other (loaded) units go on: the
//! module cache locks per unit. Its own test binary, because it points the disk
//! cache at a fresh directory for the whole process. Skips without a device.

use natsl::ops::gdn::reg_scan_spec;
use natsl::testing;
use natsl_codegen::{catalog, DType, Sparsity};
use std::time::{Duration, Instant};

#[test]
fn compiling_one_unit_does_not_block_calls_of_other_units() {
    // Before anything compiles: no disk-cache hit for the JIT-only unit below.
    let dir = std::env::temp_dir().join(format!("natsl-module-cache-test-{}", std::process::id()));
    std::env::set_var("NATSL_CACHE_DIR", &dir);
    let Some(rt) = testing::gpu_or_skip("compiling_one_unit_does_not_block_calls_of_other_units") else { return };
    let arch = rt.arch();
    let loaded = catalog::router_spec(DType::Bf16, Sparsity::Dense, arch);
    rt.function(&loaded, "tile_score", 0).unwrap();
    // The register-state scan tile is JIT-only (never embedded by `aot`): a cold NVRTC compile.
    let cold = reg_scan_spec(catalog::gdn_prefill_spec(DType::Bf16, 128, 128, arch)).unwrap();
    assert!(!catalog::shipped().contains(&natsl::KernelSpec { arch, ..cold }));
    let rt2 = rt.clone();
    let compiling = std::thread::spawn(move || {
        let t0 = Instant::now();
        rt2.module(&cold).unwrap();
        t0.elapsed()
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t0 = Instant::now();
        rt.function(&loaded, "tile_score", 0).unwrap();
        rt.module(&loaded).unwrap();
        worst = worst.max(t0.elapsed());
    }
    let overlapped = !compiling.is_finished();
    let compile = compiling.join().unwrap();
    println!("cold compile {:.2} s; lookups of a loaded unit meanwhile: worst {:?} (overlapped: {overlapped})", compile.as_secs_f64(), worst);
    let _ = std::fs::remove_dir_all(&dir);
    if !overlapped {
        println!("the compile finished within 300 ms: nothing to measure");
        return;
    }
    assert!(worst < Duration::from_millis(50), "a lookup of a loaded unit waited {worst:?} behind another unit's compile");
}
