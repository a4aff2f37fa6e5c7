//! With the `aot` feature (and nvcc at build time) every shipped specialisation
//! is embedded; without it, none is and everything is JIT-compiled.

use natsl::runtime::embedded_images;
use natsl_codegen::{catalog, emit};

#[test]
fn embedded_images_match_the_feature() {
    let imgs = embedded_images();
    if cfg!(feature = "aot") && std::env::var_os("NVCC").is_some() {
        let specs = catalog::shipped();
        for s in &specs {
            let name = emit(s).unwrap().name;
            let found = imgs.iter().find(|(n, a, _)| *n == name && *a == s.arch.nvrtc_arch());
            let (_, _, cubin) = found.unwrap_or_else(|| panic!("{name} not embedded"));
            assert_eq!(&cubin[..4], b"\x7fELF", "{name}: not a cubin");
        }
        println!("{} images embedded", imgs.len());
    } else if !cfg!(feature = "aot") {
        assert!(imgs.is_empty());
    }
}
