//! Sparse softmax timings (src/bench/sparse.rs): prints a table and appends JSON
//! lines to bench/results/sparse-<date>.jsonl.
//!
//!   cargo bench --bench sparse              # everything
//!   cargo bench --bench sparse -- decode    # only shapes whose name contains a filter
//!   NATSL_BENCH_ARCH=sm80 cargo bench ...   # force the mma.sync path on Hopper

fn main() {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let Some(rt) = natsl::testing::gpu_or_skip("bench sparse") else { return };
    let rt = match std::env::var("NATSL_BENCH_ARCH").as_deref() {
        Ok("sm80") => natsl::Runtime::with_arch(0, natsl::Arch::Sm80).expect("sm_80 path"),
        _ => rt,
    };
    let recs = natsl::bench::sparse::run(&rt, &filters);
    natsl::bench::print_table(&recs);
    match natsl::bench::write_results("sparse", &recs) {
        Ok(p) => println!("wrote {}", p.display()),
        Err(e) => println!("could not write results: {e}"),
    }
}
