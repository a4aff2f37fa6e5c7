//! GDN prefill and decode timings (src/bench/gdn.rs): prints a table and appends
//! JSON lines to bench/results/gdn-<date>.jsonl.
//!
//!   cargo bench --bench gdn            # everything
//!   cargo bench --bench gdn -- P1 dec  # only shapes whose name contains a filter

fn main() {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let Some(rt) = natsl::testing::gpu_or_skip("bench gdn") else { return };
    let recs = natsl::bench::gdn::run(&rt, &filters);
    natsl::bench::print_table(&recs);
    match natsl::bench::write_results("gdn", &recs) {
        Ok(p) => println!("appended {} records to {}", recs.len(), p.display()),
        Err(e) => println!("could not write results: {e}"),
    }
}
