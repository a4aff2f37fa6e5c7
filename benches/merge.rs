//! Merge epilogue timings (src/bench/merge.rs): prints a table (TB/s and the fraction
//! of the 4.2 TB/s copy bandwidth over the bytes it moves) and appends JSON lines to
//! bench/results/merge-<date>.jsonl.
//!
//!   cargo bench --bench merge               # every shape
//!   cargo bench --bench merge -- T=131072   # only shapes whose name contains a filter
//!   NATSL_BENCH_ARCH=sm80 cargo bench ...   # the sm_80 image on Hopper

fn main() {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let Some(rt) = natsl::testing::gpu_or_skip("bench merge") else { return };
    let rt = match std::env::var("NATSL_BENCH_ARCH").as_deref() {
        Ok("sm80") => natsl::Runtime::with_arch(0, natsl::Arch::Sm80).expect("sm_80 path"),
        _ => rt,
    };
    let recs = natsl::bench::merge::run(&rt, &filters);
    natsl::bench::print_table(&recs);
    match natsl::bench::write_results("merge", &recs) {
        Ok(p) => println!("wrote {}", p.display()),
        Err(e) => println!("could not write results: {e}"),
    }
}
