//! include/natsl.h is generated from capi/src by cbindgen; this fails while the
//! committed header differs from a fresh generation. Regenerate with
//! `NATSL_BLESS=1 cargo test -p natsl-capi --test header_fresh`.

use std::path::Path;

#[test]
fn natsl_h_matches_the_rust_side() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("capi/cbindgen.toml");
    let mut fresh = Vec::new();
    cbindgen::Builder::new().with_src(dir.join("src/lib.rs")).with_config(config).generate().expect("cbindgen").write(&mut fresh);
    let fresh = String::from_utf8(fresh).unwrap();
    let path = dir.join("../include/natsl.h");
    if std::env::var("NATSL_BLESS").as_deref() == Ok("1") {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(committed == fresh, "include/natsl.h is stale: regenerate it with `NATSL_BLESS=1 cargo test -p natsl-capi --test header_fresh`");
}
