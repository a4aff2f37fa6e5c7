//! The specialisations the crate ships (what `natsl kernels` lists, what the
//! NVRTC tier compiles, and what the `aot` feature embeds). Anything else a
//! caller asks for is generated and JIT-compiled on first use.

use crate::spec::*;

const ARCHES: [Arch; 2] = [Arch::Sm80, Arch::Sm90a];
const DTYPES: [DType; 2] = [DType::Bf16, DType::F16];

/// Router: 256 threads per CTA, one 64-token chunk per CTA row of work.
pub const ROUTER_TILE: Tile = Tile::new(64, 0, 8, 1);

/// The router spec for a dtype, policy class and arch.
pub fn router_spec(dtype: DType, sparsity: Sparsity, arch: Arch) -> KernelSpec {
    KernelSpec { op: Op::Router, dtype, dims: HeadDims { dk: 0, dv: 0 }, chunk: 64, tile: ROUTER_TILE, sparsity, arch }
}

fn router_specs() -> Vec<KernelSpec> {
    let mut v = Vec::new();
    for arch in ARCHES {
        for dtype in DTYPES {
            for sp in [Sparsity::Dense, Sparsity::TopKRuntime] {
                v.push(router_spec(dtype, sp, arch));
            }
        }
    }
    v
}

fn gdn_specs() -> Vec<KernelSpec> {
    Vec::new()
}

fn sparse_specs() -> Vec<KernelSpec> {
    Vec::new()
}

/// Every shipped specialisation, sorted and unique.
pub fn shipped() -> Vec<KernelSpec> {
    let mut v = router_specs();
    v.extend(gdn_specs());
    v.extend(sparse_specs());
    v.sort();
    v.dedup();
    v
}
