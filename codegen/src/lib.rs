//! natsl-codegen: specialises natsl's templated CUDA kernels (`cuda/`) into
//! self-contained translation units, one per [`KernelSpec`].
//!
//! Used by natsl's `build.rs` (ahead-of-time compilation with the `aot`
//! feature) and at run time (JIT through NVRTC).

pub mod catalog;
pub mod emit;
pub mod spec;

pub use emit::{emit, EmitError, Unit};
pub use spec::*;

/// sha256 of the ABI headers (natsl_params.h and params/*.h, in path order):
/// recorded in the generated src/params.rs so a test can tell when it is stale.
pub fn params_header_hash() -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut paths: Vec<&str> = emit::template_paths().filter(|p| p.starts_with("include/")).collect();
    paths.sort();
    for p in paths {
        h.update(p.as_bytes());
        h.update([0u8]);
        h.update(emit::template(p).unwrap_or("").as_bytes());
        h.update([0u8]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
