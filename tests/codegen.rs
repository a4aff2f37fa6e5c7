//! Tier 1: the code generator is deterministic, names symbols stably, and every
//! shipped unit is self-contained (no unresolved include, no CUDA header).

use natsl_codegen::{catalog, emit, spec::*};

#[test]
fn generation_is_deterministic_and_self_contained() {
    for spec in catalog::shipped() {
        let a = emit(&spec).unwrap();
        let b = emit(&spec).unwrap();
        assert_eq!(a, b, "{spec}");
        assert!(!a.entries.is_empty(), "{spec}");
        assert!(!a.source.contains("#include"), "{spec}: an include was left unresolved");
        assert!(a.source.contains(&format!("#define NATSL_KERNEL(entry) {}_##entry", a.name)));
    }
}

#[test]
fn symbols_are_stable_and_readable() {
    let s = catalog::router_spec(DType::Bf16, Sparsity::Dense, Arch::Sm90a);
    assert_eq!(s.symbol(), "natsl_router_bf16_c64_m64n0w8s1_dense_sm90a");
    let u = emit(&s).unwrap();
    // Pool + score, then select (the fused entries `route` / `tile_route` and the blocked
    // pool's `score` / `select` were removed).
    assert_eq!(u.entries, vec!["tile_score".to_string(), "tile_select".to_string()]);
    assert_eq!(u.symbol("tile_score"), "natsl_router_bf16_c64_m64n0w8s1_dense_sm90a_tile_score");
    let k = catalog::router_spec(DType::F16, Sparsity::TopK(8), Arch::Sm80);
    assert_eq!(k.symbol(), "natsl_router_f16_c64_m64n0w8s1_top8_sm80");
    assert!(emit(&k).unwrap().source.contains("#define NATSL_TOPK 8"));
}

#[test]
fn shipped_specs_are_unique_by_symbol() {
    let specs = catalog::shipped();
    let mut names: Vec<String> = specs.iter().map(|s| s.symbol()).collect();
    names.sort();
    let n = names.len();
    names.dedup();
    assert_eq!(n, names.len(), "two specs share a symbol");
}

#[test]
fn spec_macros_reach_the_unit() {
    let s = catalog::router_spec(DType::F16, Sparsity::TopKRuntime, Arch::Sm80);
    let u = emit(&s).unwrap();
    for m in ["#define NATSL_DTYPE natsl::f16", "#define NATSL_THREADS 256", "#define NATSL_TOPK -1", "#define NATSL_SM90A 0"] {
        assert!(u.source.contains(m), "missing {m}");
    }
}
