//! src/params.rs is generated from the ABI headers; this fails when a header
//! changed and the file was not regenerated
//! (`cargo run -p natsl-codegen --features bindgen --bin gen-params`).

#[test]
fn params_rs_matches_the_headers() {
    let text = include_str!("../src/params.rs");
    let recorded = text.lines().find_map(|l| l.strip_prefix("//! header-sha256: ")).expect("params.rs has no header-sha256 line");
    assert_eq!(recorded.trim(), natsl_codegen::params_header_hash(), "src/params.rs is stale: regenerate it with `cargo run -p natsl-codegen --features bindgen --bin gen-params`");
}
