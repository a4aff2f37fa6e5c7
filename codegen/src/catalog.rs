//! The specialisations the crate ships (what `natsl kernels` lists, what the
//! NVRTC tier compiles, and what the `aot` feature embeds). Anything else a
//! caller asks for is generated and JIT-compiled on first use.

use crate::spec::*;

const ARCHES: [Arch; 2] = [Arch::Sm80, Arch::Sm90a];
const DTYPES: [DType; 2] = [DType::Bf16, DType::F16];

/// Router: 64-token chunks. The tile names the unit only (`m64n0w8s1`: kept from the
/// removed blocked pool's 256-thread CTAs, so symbols and cache keys stay); the two
/// kernels' CTA sizes are TILE_THREADS / TILE_SELECT_THREADS in cuda/router/router.cuh.
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
    let mut v = Vec::new();
    for arch in ARCHES {
        for dtype in DTYPES {
            for (dk, dv) in GDN_DIMS {
                v.push(gdn_prefill_spec(dtype, dk, dv, arch));
                v.push(gdn_decode_spec(dtype, dk, dv, arch));
                v.extend(gdn_fused_spec(dtype, dk, dv, arch));
            }
        }
    }
    v
}

/// Tile of the fused warp-specialised GDN prefill (sm_90a, dk = 128, dv = 128 or 256):
/// 64-token chunks, 128 state columns per CTA, 12 warps; stages = 4 marks the unit.
pub const GDN_FUSED_TILE: Tile = Tile::new(64, 128, 12, 4);

/// The fused GDN prefill spec (entries `fused_prep`, `fused_split`, `fused_split_cp_a`,
/// `fused_split_cp_c`, `cp_combine`) where it has a kernel.
pub fn gdn_fused_spec(dtype: DType, dk: u32, dv: u32, arch: Arch) -> Option<KernelSpec> {
    (arch == Arch::Sm90a && dk == 128 && (dv == 128 || dv == 256)).then(|| KernelSpec { tile: GDN_FUSED_TILE, ..gdn_prefill_spec(dtype, dk, dv, arch) })
}

/// GDN (dk, dv) pairs shipped: the square production heads and the NAtS-L pairs.
pub const GDN_DIMS: [(u32, u32); 5] = [(64, 64), (128, 128), (256, 256), (128, 256), (192, 384)];

/// GDN prefill scan tile: block_m = chunk, block_n = state columns per CTA,
/// warps, smem stages of the chunk inputs (always 1: the scan prefetches the next
/// chunk's operands in two groups into the one stage as each group is consumed).
pub fn gdn_prefill_tile(dk: u32, dv: u32) -> Tile {
    match (dk, dv) {
        (64, _) => Tile::new(64, 32, 4, 1),
        (192, _) => Tile::new(64, 32, 4, 1),
        (256, _) => Tile::new(64, 64, 8, 1),
        _ => Tile::new(64, 64, 4, 1),
    }
}

/// GDN decode tile: 64 state columns per CTA and 4 warps up to dk = 128, else 32
/// (the state slice lives in registers: 16 float4 per thread at dk = 128).
/// H200 2026-11-28, 16/32 heads, d128, n64w4 vs n32w4: B32 37.1 vs 38.1 us, B128
/// 134.1 vs 138.7, B512 523 vs 542 (n64w8, n32w8, n16w2 slower).
pub fn gdn_decode_tile(dk: u32, dv: u32) -> Tile {
    if dk <= 128 && dv % 64 == 0 {
        Tile::new(1, 64, 4, 1)
    } else {
        Tile::new(1, 32, 4, 1)
    }
}

/// The GDN prefill spec (entries `prep_grouped`, `scan`, and the context-parallel
/// `scan_cp_a`, `cp_combine`, `scan_cp_c`); labels are read at run time.
pub fn gdn_prefill_spec(dtype: DType, dk: u32, dv: u32, arch: Arch) -> KernelSpec {
    KernelSpec { op: Op::GdnPrefill, dtype, dims: HeadDims { dk, dv }, chunk: 64, tile: gdn_prefill_tile(dk, dv), sparsity: Sparsity::Dense, arch }
}

/// The GDN decode spec (entry `step`).
pub fn gdn_decode_spec(dtype: DType, dk: u32, dv: u32, arch: Arch) -> KernelSpec {
    KernelSpec { op: Op::GdnDecode, dtype, dims: HeadDims { dk, dv }, chunk: 64, tile: gdn_decode_tile(dk, dv), sparsity: Sparsity::Dense, arch }
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

/// Merge epilogue: 256 threads per CTA; block_m = rows (tokens of one head) per CTA,
/// from the threads per row of cuda/merge/merge.cuh (dvs / 8 vectors, at most 32 threads).
pub fn merge_tile(dvs: u32) -> Tile {
    let nv = dvs / 8;
    let lanes = [32, 16, 8, 4, 2, 1].into_iter().find(|l| nv % l == 0).unwrap_or(1);
    Tile::new(256 / lanes, 0, 8, 1)
}

/// The softmax head dims dvs the merge ships: every dv of [`SPARSE_DIMS`].
pub const MERGE_DIMS: [u32; 3] = [64, 128, 256];

/// The merge spec (entry `merge`) for softmax head dim `dvs`.
pub fn merge_spec(dtype: DType, dvs: u32, arch: Arch) -> KernelSpec {
    KernelSpec { op: Op::Merge, dtype, dims: HeadDims { dk: 0, dv: dvs }, chunk: 64, tile: merge_tile(dvs), sparsity: Sparsity::Dense, arch }
}

fn merge_specs() -> Vec<KernelSpec> {
    let mut v = Vec::new();
    for arch in ARCHES {
        for dtype in DTYPES {
            for dvs in MERGE_DIMS {
                v.push(merge_spec(dtype, dvs, arch));
            }
        }
    }
    v
}

/// Every shipped specialisation, sorted and unique.
pub fn shipped() -> Vec<KernelSpec> {
    let mut v = router_specs();
    v.extend(gdn_specs());
    v.extend(sparse_specs());
    v.extend(merge_specs());
    v.sort();
    v.dedup();
    v
}
