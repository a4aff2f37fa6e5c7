//! Layer prefill timings (src/bench/layer.rs): natsl-340M dims, router budget
//! KeepFraction(0.3), the call on two streams and on one beside each op alone; prints a
//! table and appends JSON lines to bench/results/layer-<date>.jsonl.
//!
//!   cargo bench --bench layer                 # every shape
//!   cargo bench --bench layer -- T=32768      # only shapes whose name contains a filter
//!   NATSL_BENCH_ARCH=sm80 cargo bench ...     # the sm_80 path on Hopper

fn main() {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let Some(rt) = natsl::testing::gpu_or_skip("bench layer") else { return };
    let rt = match std::env::var("NATSL_BENCH_ARCH").as_deref() {
        Ok("sm80") => natsl::Runtime::with_arch(0, natsl::Arch::Sm80).expect("sm_80 path"),
        _ => rt,
    };
    let recs = natsl::bench::layer::run(&rt, &filters);
    natsl::bench::print_table(&recs);
    match natsl::bench::write_results("layer", &recs) {
        Ok(p) => println!("wrote {}", p.display()),
        Err(e) => println!("could not write results: {e}"),
    }
}
