//! With the `aot` feature (and nvcc at build time) every shipped specialisation
//! is embedded; without it, none is and everything is JIT-compiled.

use natsl::runtime::embedded_images;
use natsl_codegen::{catalog, emit};

#[test]
fn embedded_images_match_the_feature() {
    let imgs = embedded_images();
    if cfg!(feature = "aot") && std::env::var_os("NVCC").is_some() {
        let specs = catalog::shipped();
        let mut missing = Vec::new();
        for s in &specs {
            let name = emit(s).unwrap().name;
            match imgs.iter().find(|(n, a, _)| *n == name && *a == s.arch.nvrtc_arch()) {
                Some((_, _, cubin)) => assert_eq!(&cubin[..4], b"\x7fELF", "{name}: not a cubin"),
                None => missing.push(name),
            }
        }
        assert!(missing.is_empty(), "not embedded (nvcc failed; see the build warnings): {missing:?}");
        println!("{} images embedded", imgs.len());
    } else if !cfg!(feature = "aot") {
        assert!(imgs.is_empty());
    }
}
