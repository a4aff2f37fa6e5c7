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
    let mut v = Vec::new();
    for arch in ARCHES {
        for dtype in DTYPES {
            for (dk, dv) in SPARSE_DIMS {
                let dims = HeadDims { dk, dv };
                v.push(sparse_prefill_spec(dtype, dims, arch));
                v.push(sparse_decode_spec(dtype, dims, arch));
            }
        }
    }
    v
}

/// Head dims (dk, dv) the sparse softmax ships: NAtS-L 64/128, and dk = dv.
pub const SPARSE_DIMS: [(u32, u32); 4] = [(64, 128), (64, 64), (128, 128), (256, 256)];

/// Sparse prefill: one CTA per (64-row query chunk, query head), 4 warps, 64-key blocks.
pub const SPARSE_PREFILL_TILE: Tile = Tile::new(64, 64, 4, 1);

/// The sparse prefill spec (both block-list formats share it: the format is a run-time mode).
pub fn sparse_prefill_spec(dtype: DType, dims: HeadDims, arch: Arch) -> KernelSpec {
    KernelSpec { op: Op::SparsePrefill, dtype, dims, chunk: 64, tile: SPARSE_PREFILL_TILE, sparsity: Sparsity::Routed, arch }
}

/// Sparse decode tile: 16 query rows, 64-key pages, 4 warps, a ring of pages
/// (2 deep at d 256, where a page is 64 KB; 3 otherwise).
pub fn sparse_decode_tile(dims: HeadDims) -> Tile {
    Tile::new(16, 64, 4, if dims.dk + dims.dv > 256 { 2 } else { 3 })
}

/// The sparse decode spec (decode and combine entries).
pub fn sparse_decode_spec(dtype: DType, dims: HeadDims, arch: Arch) -> KernelSpec {
    KernelSpec { op: Op::SparseDecode, dtype, dims, chunk: 64, tile: sparse_decode_tile(dims), sparsity: Sparsity::Routed, arch }
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
