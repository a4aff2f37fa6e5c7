//! Block-sparse flash softmax (SPEC.md section 5): prefill over routed chunks (or a
//! general FlexAttention-style block list) and paged decode with split-KV.
//!
//! Prefill: for a query at position i of chunk c, the visible keys are every key of
//! the earlier chunks listed for its mask head, plus keys t <= i of chunk c. Two list
//! formats share one kernel ([`BlockMask`]): the router's compact ATTN lists, and
//! per (sequence, mask head, 64-row query block) KV block lists.
//!
//! Decode: one to eight new queries per sequence against 64-token KV pages
//! ([`PagedKv`]); all lengths and page ids live in device memory (no host round trip).
//!
//! Every entry validates shapes, strides, dtypes and alignment first
//! ([`validate_prefill`], [`validate_decode`] need no GPU) and names the bad argument.

use crate::batch::{validate_cu_seqlens, Batch, CHUNK};
use crate::error::{Error, Result};
use crate::params::{NatslSparseDecodeParams, NatslSparsePrefillParams, NATSL_SPARSE_BLOCKS, NATSL_SPARSE_MAX_QUERIES, NATSL_SPARSE_ROUTED};
use crate::runtime::Runtime;
use crate::tensor::{ContextId, DType, Operands, TensorMut, TensorRef};
use crate::tma;
use crate::workspace::{align, Scratch};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use natsl_codegen::{catalog, HeadDims};

// SAFETY: both params structs are plain C data (integers, floats, device pointers),
// laid out by bindgen from cuda/include/params/sparse.h exactly as the kernels read them.
unsafe impl DeviceRepr for NatslSparsePrefillParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for NatslSparseDecodeParams {}

/// Threads per CTA of every sparse kernel.
pub const THREADS: u32 = 128;
/// Most new queries per sequence in one decode call.
pub const MAX_QUERIES: usize = NATSL_SPARSE_MAX_QUERIES as usize;
/// RMSNorm epsilon (SPEC.md).
pub const NORM_EPS: f32 = 1e-6;

/// The (dk, dv) pairs the kernels support.
pub fn supported_dims() -> &'static [(u32, u32)] {
    &catalog::SPARSE_DIMS
}

/// Which KV blocks each 64-row query block sees (block size 64 = one chunk).
#[derive(Clone, Debug)]
pub enum BlockMask<'a> {
    /// The router's compact lists: `attn_list` i32 `[Hr, num_slots]` (list of (n, r) at
    /// `r * num_slots + slot_base(n)`, ascending), `attn_count` i32 `[N, Hr]`. Query chunk c
    /// sees the listed chunks `< c` and itself causally. Query head j uses routing head
    /// `j / (Hq / Hr)`; Hr must divide Hkv.
    Routed { attn_list: TensorRef<'a>, attn_count: TensorRef<'a> },
    /// FlexAttention-style lists: `kv_num_blocks` i32 `[N, Hm, QB]`, `kv_indices` i32
    /// `[N, Hm, QB, KB]` (block indices local to the sequence, ascending, no repeats).
    /// Query block c sees a listed block `< c` fully and block `c` causally; larger or
    /// negative entries are skipped. Query head j uses mask head `j / (Hq / Hm)`.
    /// QB must be at least the batch's largest chunk count.
    Blocks { kv_num_blocks: TensorRef<'a>, kv_indices: TensorRef<'a> },
}

/// Which prefill kernel runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefillKernel {
    /// The best proven kernel for the device and mask: on the sm_90a path
    /// [`PrefillKernel::WarpSpecialized`] for router lists and [`PrefillKernel::Wgmma`]
    /// for block lists (and for views no TMA map can describe); mma.sync elsewhere.
    #[default]
    Auto,
    /// FlashAttention-2 style on mma.sync (every arch).
    MmaSync,
    /// wgmma, one warpgroup per 64-row chunk (sm_90a only; an error on other code paths).
    Wgmma,
    /// FlashAttention-3 structure (sm_90a only; entry `prefill_ws`): persistent 384-thread
    /// CTAs (one per SM) running tiles of 128 query rows (two chunks) from a tile counter
    /// of the runtime's stream, a producer warpgroup loading Q and a K/V ring of
    /// 128-key stages (64 at dv 256) by TMA, two ping-ponging consumer warpgroups with
    /// the next QK^T issued under each softmax. ROUTED lists only: a BLOCKS mask is an
    /// error, as is a view that no TMA tensor map describes.
    WarpSpecialized,
}

/// The prefill kernels a runtime can run (the explicit choices, Auto excluded).
pub fn prefill_kernels(rt: &Runtime) -> Vec<PrefillKernel> {
    let mut v = vec![PrefillKernel::MmaSync];
    if rt.arch() == natsl_codegen::Arch::Sm90a {
        v.push(PrefillKernel::Wgmma);
        v.push(PrefillKernel::WarpSpecialized);
    }
    v
}

/// Options shared by prefill and decode.
#[derive(Clone, Debug, Default)]
pub struct SparseOptions<'a> {
    /// Softmax scale; `None` = dk^-1/2. Must be finite and positive with
    /// `scale * log2(e)` finite (the rule of both families, see `ops::check_scale`).
    pub scale: Option<f32>,
    /// RMSNorm weight `[dk]` (activation dtype) applied to q in the kernel.
    pub q_norm_w: Option<TensorRef<'a>>,
    /// RMSNorm weight `[dk]` applied to k in the kernel.
    pub k_norm_w: Option<TensorRef<'a>>,
    /// Decode only: force the number of KV splits (`None` = chosen to fill the GPU).
    pub num_splits: Option<usize>,
    /// Prefill only: which kernel runs.
    pub kernel: PrefillKernel,
}

/// What validation of a prefill call found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefillPlan {
    pub dtype: natsl_codegen::DType,
    pub dims: HeadDims,
    pub hq: usize,
    pub hkv: usize,
    /// Routing / mask heads.
    pub hm: usize,
    pub max_chunks: usize,
    /// BLOCKS only: the list geometry (QB, KB).
    pub blocks: Option<(usize, usize)>,
    pub scale: f32,
    pub smem_bytes: u32,
    pub grid: u32,
}

fn check_dims(dk: usize, dv: usize) -> Result<HeadDims> {
    super::check_head_dims("sparse", dk, dv, supported_dims(), "q", "v")?;
    Ok(HeadDims { dk: dk as u32, dv: dv as u32 })
}

fn check_norm(arg: &'static str, w: &Option<TensorRef>, dtype: DType, dk: usize) -> Result<()> {
    if let Some(w) = w {
        w.check_dtype(arg, &[dtype])?;
        w.check_shape(arg, &[Some(dk)])?;
        w.check_layout(arg, 16)?;
    }
    Ok(())
}

fn check_scale(s: Option<f32>, dk: usize) -> Result<f32> {
    super::check_scale(s, dk)
}

fn check_i32(arg: &'static str, t: &TensorRef, shape: &[Option<usize>]) -> Result<()> {
    t.check_dtype(arg, &[DType::I32])?;
    t.check_shape(arg, shape)?;
    t.check_contiguous(arg)?;
    t.check_layout(arg, 4)
}

fn check_lse(lse: Option<&TensorRef>, rows: usize, hq: usize) -> Result<()> {
    if let Some(l) = lse {
        l.check_dtype("lse", &[DType::F32])?;
        l.check_shape("lse", &[Some(rows), Some(hq)])?;
        l.check_layout("lse", 4)?;
    }
    Ok(())
}

/// Prefill smem bytes: Q, K, V tiles and the per-key RMS scales.
pub fn prefill_smem(dims: HeadDims) -> u32 {
    64 * (2 * dims.dk + dims.dv) * 2 + 64 * 4
}

/// Smem bytes of the sm_90a wgmma prefill: Q, a ring of K/V tiles and per-key RMS
/// scales, plus 1 KB to align the tiles to 1024 bytes.
pub fn prefill_wgmma_smem(dims: HeadDims) -> u32 {
    let st = crate::params::NATSL_SPARSE_WGMMA_STAGES;
    64 * dims.dk * 2 + st * 64 * (dims.dk + dims.dv) * 2 + st * 64 * 4 + 1024
}

/// Threads per CTA of the warp-specialized prefills: 1 producer + 2 consumer warpgroups.
pub const WS_THREADS: u32 = 384;

/// Keys per K/V stage of the TMA warp-specialized prefill (`WsTile::BN` in cuda/sparse/prefill_ws.cuh).
pub fn prefill_ws_keys(dims: HeadDims) -> u32 {
    if dims.dv <= 128 {
        128
    } else {
        64
    }
}

/// K/V ring depth of the TMA warp-specialized prefill (`WsTile::ST`).
pub fn prefill_ws_stages(dims: HeadDims) -> u32 {
    if dims.dk + dims.dv >= 256 {
        2
    } else {
        3
    }
}

/// Smem bytes of the TMA warp-specialized prefill (`WsTile::BYTES`): two [64][dk] Q tiles,
/// the ring of [BN][dk] K and [BN][dv] V stages, two [64][dv] O staging tiles where they
/// fit in 227 KB (`WsTile::STAGE_O`), per-key RMS scales per stage, 6 mbarriers per stage
/// + 2 (Q full, Q empty), a 16-byte descriptor per stage, the producer's 32-entry list
/// window, plus 1 KB to align the tiles.
pub fn prefill_ws_smem(dims: HeadDims) -> u32 {
    let (st, bn) = (prefill_ws_stages(dims), prefill_ws_keys(dims));
    let base = 2 * 64 * dims.dk * 2 + st * bn * (dims.dk + dims.dv) * 2 + st * bn * 4 + ((6 * st + 2) * 8).next_multiple_of(16) + st * 16 + 32 * 8 + 1024;
    let o_stage = 2 * 64 * dims.dv * 2;
    if base + o_stage <= 232_448 {
        base + o_stage
    } else {
        base
    }
}

/// Tiles of the warp-specialized prefill: one per (chunk pair, sequence, query head).
pub fn prefill_ws_grid(max_chunks: usize, num_seqs: usize, hq: usize) -> u64 {
    (max_chunks.div_ceil(2) as u64).saturating_mul(num_seqs as u64).saturating_mul(hq as u64)
}

/// Validate a prefill call on the host (no GPU needed). `cu_seqlens` as for [`Batch`].
/// Aliasing: none; `o` and `lse` may not overlap each other or any input.
#[allow(clippy::too_many_arguments)]
pub fn validate_prefill(cu_seqlens: &[i32], q: &TensorRef, k: &TensorRef, v: &TensorRef, mask: &BlockMask, opts: &SparseOptions, o: &TensorRef, lse: Option<&TensorRef>) -> Result<PrefillPlan> {
    validate_prefill_in(None, cu_seqlens, q, k, v, mask, opts, o, lse)
}

/// [`validate_prefill`], also checking that every tensor is memory of context `ctx`.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn validate_prefill_in(ctx: Option<ContextId>, cu_seqlens: &[i32], q: &TensorRef, k: &TensorRef, v: &TensorRef, mask: &BlockMask, opts: &SparseOptions, o: &TensorRef, lse: Option<&TensorRef>) -> Result<PrefillPlan> {
    let max_chunks = validate_cu_seqlens(cu_seqlens)?;
    let n = cu_seqlens.len() - 1;
    let t = *cu_seqlens.last().unwrap() as usize;
    q.check_dtype("q", &[DType::Bf16, DType::F16])?;
    q.check_shape("q", &[Some(t), None, None])?;
    q.check_layout("q", 16)?;
    let (hq, dk) = (q.dim(1), q.dim(2));
    k.check_dtype("k", &[q.dtype()])?;
    k.check_shape("k", &[Some(t), None, Some(dk)])?;
    k.check_layout("k", 16)?;
    let hkv = k.dim(1);
    if !hq.is_multiple_of(hkv) {
        return Err(Error::invalid("k", format!("{hkv} kv heads do not divide {hq} query heads")));
    }
    v.check_dtype("v", &[q.dtype()])?;
    v.check_shape("v", &[Some(t), Some(hkv), None])?;
    v.check_layout("v", 16)?;
    let dims = check_dims(dk, v.dim(2))?;
    let dv = v.dim(2);
    o.check_dtype("o", &[q.dtype()])?;
    o.check_shape("o", &[Some(t), Some(hq), Some(dv)])?;
    o.check_layout("o", 16)?;
    check_lse(lse, t, hq)?;
    check_norm("q_norm_w", &opts.q_norm_w, q.dtype(), dk)?;
    check_norm("k_norm_w", &opts.k_norm_w, q.dtype(), dk)?;
    let scale = check_scale(opts.scale, dk)?;
    let slots = crate::batch::num_slots(t, n);
    let (hm, blocks) = match mask {
        BlockMask::Routed { attn_list, attn_count } => {
            check_i32("attn_list", attn_list, &[None, Some(slots)])?;
            let hr = attn_list.dim(0);
            if !hkv.is_multiple_of(hr) {
                return Err(Error::invalid("attn_list", format!("{hr} routing heads do not divide {hkv} kv heads")));
            }
            check_i32("attn_count", attn_count, &[Some(n), Some(hr)])?;
            (hr, None)
        }
        BlockMask::Blocks { kv_num_blocks, kv_indices } => {
            check_i32("kv_num_blocks", kv_num_blocks, &[Some(n), None, None])?;
            let (hm, qb) = (kv_num_blocks.dim(1), kv_num_blocks.dim(2));
            if !hq.is_multiple_of(hm) {
                return Err(Error::invalid("kv_num_blocks", format!("{hm} mask heads do not divide {hq} query heads")));
            }
            if qb < max_chunks {
                return Err(Error::invalid("kv_num_blocks", format!("{qb} query blocks, but a sequence has {max_chunks} chunks")));
            }
            check_i32("kv_indices", kv_indices, &[Some(n), Some(hm), Some(qb), None])?;
            (hm, Some((qb, kv_indices.dim(3))))
        }
    };
    let grid = (max_chunks as u64).saturating_mul(n as u64).saturating_mul(hq as u64);
    if grid > i32::MAX as u64 || t > i32::MAX as usize / 2 {
        return Err(Error::invalid("q", format!("problem too large: {grid} CTAs, {t} tokens")));
    }
    let mut ops = Operands::new();
    ops.read("q", q).read("k", k).read("v", v);
    match mask {
        BlockMask::Routed { attn_list, attn_count } => ops.read("attn_list", attn_list).read("attn_count", attn_count),
        BlockMask::Blocks { kv_num_blocks, kv_indices } => ops.read("kv_num_blocks", kv_num_blocks).read("kv_indices", kv_indices),
    };
    read_norms(&mut ops, opts).write("o", o);
    if let Some(l) = lse {
        ops.write("lse", l);
    }
    ops.check(ctx)?;
    let dtype = q.dtype().activation().unwrap();
    Ok(PrefillPlan { dtype, dims, hq, hkv, hm, max_chunks, blocks, scale, smem_bytes: prefill_smem(dims), grid: grid as u32 })
}

fn read_norms<'o>(ops: &'o mut Operands, opts: &SparseOptions) -> &'o mut Operands {
    if let Some(w) = &opts.q_norm_w {
        ops.read("q_norm_w", w);
    }
    if let Some(w) = &opts.k_norm_w {
        ops.read("k_norm_w", w);
    }
    ops
}

fn ptr_or_null(t: &Option<TensorRef>) -> *const std::ffi::c_void {
    t.as_ref().map_or(std::ptr::null(), |w| w.ptr() as *const _)
}

/// The kernel a prefill call runs: the unit, its entry and dynamic shared memory, and
/// the TMA maps of q, k, v (`tma::NONE` where the kernel loads none).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PrefillChoice {
    pub spec: natsl_codegen::KernelSpec,
    pub entry: &'static str,
    pub smem_bytes: u32,
    pub tma: [crate::params::NatslTensorMap; 3],
}

/// Resolve `opts.kernel` for this device, mask kind and views (validated by
/// [`validate_prefill_in`] into `plan`): the errors of a kernel this code path or these
/// views cannot run, before anything is launched.
pub(crate) fn prefill_choice(rt: &Runtime, cu_seqlens: &[i32], plan: &PrefillPlan, q: &TensorRef, k: &TensorRef, v: &TensorRef, routed: bool, opts: &SparseOptions) -> Result<PrefillChoice> {
    let spec = catalog::sparse_prefill_spec(plan.dtype, plan.dims, rt.arch());
    let sm90a = rt.arch() == natsl_codegen::Arch::Sm90a;
    // TMA maps of q, k, v (the warp-specialized kernel); None where a view has none.
    let maps = || -> Result<[crate::params::NatslTensorMap; 3]> { Ok([tma::encode_thd("q", q, 64)?, tma::encode_thd("k", k, 64)?, tma::encode_thd("v", v, 64)?]) };
    let mut tma_maps = [tma::NONE; 3];
    // Under Auto, `natsl tune`'s choice for this shape bucket on this GPU (a
    // warp-specialized one only where q, k, v have TMA maps), else the heuristics below.
    let requested = match opts.kernel {
        PrefillKernel::Auto => match crate::tune::sparse_prefill(rt, plan, cu_seqlens, routed) {
            PrefillKernel::WarpSpecialized if maps().is_err() => PrefillKernel::Auto,
            k => k,
        },
        k => k,
    };
    let kernel = match requested {
        PrefillKernel::Auto if sm90a && routed => match maps() {
            Ok(m) => {
                tma_maps = m;
                PrefillKernel::WarpSpecialized
            }
            Err(_) => PrefillKernel::Wgmma,
        },
        PrefillKernel::Auto if sm90a => PrefillKernel::Wgmma,
        PrefillKernel::Auto => PrefillKernel::MmaSync,
        k => k,
    };
    let need_sm90a = |what: &str| -> Result<()> {
        if sm90a {
            Ok(())
        } else {
            Err(Error::Unsupported(format!("the {what} prefill needs the sm_90a code path, not {:?}", rt.arch())))
        }
    };
    let (entry, smem_bytes) = match kernel {
        PrefillKernel::Auto | PrefillKernel::MmaSync => ("prefill", plan.smem_bytes),
        PrefillKernel::Wgmma => {
            need_sm90a("wgmma")?;
            ("prefill_wgmma", prefill_wgmma_smem(plan.dims))
        }
        PrefillKernel::WarpSpecialized => {
            need_sm90a("warp-specialized")?;
            if !routed {
                return Err(Error::Unsupported("the warp-specialized prefill walks router lists; block lists run PrefillKernel::Wgmma (or Auto)".into()));
            }
            if requested != PrefillKernel::Auto {
                tma_maps = maps()?;
            }
            ("prefill_ws", prefill_ws_smem(plan.dims))
        }
    };
    Ok(PrefillChoice { spec, entry, smem_bytes, tma: tma_maps })
}

/// Block-sparse prefill: o `[T, Hq, dv]` (and lse `[T, Hq]` f32, natural log) from
/// q `[T, Hq, dk]`, k `[T, Hkv, dk]`, v `[T, Hkv, dv]` (strided views accepted).
/// No aliasing: o and lse may not overlap each other or any input.
#[allow(clippy::too_many_arguments)]
pub fn prefill(rt: &Runtime, batch: &Batch, q: &TensorRef, k: &TensorRef, v: &TensorRef, mask: &BlockMask, opts: &SparseOptions, o: &mut TensorMut, lse: Option<&mut TensorMut>) -> Result<()> {
    let plan = validate_prefill_in(Some(super::launch_context(rt, Some(batch))?), batch.cu_seqlens(), q, k, v, mask, opts, o.view(), lse.as_deref().map(|l| l.view()))?;
    let routed = matches!(mask, BlockMask::Routed { .. });
    let PrefillChoice { spec, entry, smem_bytes, tma: tma_maps } = prefill_choice(rt, batch.cu_seqlens(), &plan, q, k, v, routed, opts)?;
    let f = rt.function(&spec, entry, smem_bytes)?;
    let null = std::ptr::null::<i32>();
    let (mode, attn_list, attn_count, kvn, kvi) = match mask {
        BlockMask::Routed { attn_list, attn_count } => (NATSL_SPARSE_ROUTED, attn_list.ptr() as *const i32, attn_count.ptr() as *const i32, null, null),
        BlockMask::Blocks { kv_num_blocks, kv_indices } => (NATSL_SPARSE_BLOCKS, null, null, kv_num_blocks.ptr() as *const i32, kv_indices.ptr() as *const i32),
    };
    let (qb, kb) = plan.blocks.unwrap_or((0, 0));
    let (lse_ptr, lse_st) = lse.as_ref().map_or((std::ptr::null_mut(), 0), |l| (l.ptr() as *mut f32, l.stride(0) as i64));
    let p = NatslSparsePrefillParams {
        batch: batch.raw(),
        q: q.ptr() as *const _,
        q_stride_t: q.stride(0) as i64,
        q_stride_h: q.stride(1) as i64,
        k: k.ptr() as *const _,
        k_stride_t: k.stride(0) as i64,
        k_stride_h: k.stride(1) as i64,
        v: v.ptr() as *const _,
        v_stride_t: v.stride(0) as i64,
        v_stride_h: v.stride(1) as i64,
        o: o.ptr() as *mut _,
        o_stride_t: o.stride(0) as i64,
        o_stride_h: o.stride(1) as i64,
        lse: lse_ptr,
        lse_stride_t: lse_st,
        q_norm_w: ptr_or_null(&opts.q_norm_w),
        k_norm_w: ptr_or_null(&opts.k_norm_w),
        norm_eps: NORM_EPS,
        scale_log2: plan.scale * std::f32::consts::LOG2_E,
        num_q_heads: plan.hq as i32,
        num_kv_heads: plan.hkv as i32,
        num_mask_heads: plan.hm as i32,
        mode: mode as i32,
        attn_list,
        attn_count,
        kv_num_blocks: kvn,
        kv_indices: kvi,
        max_q_blocks: qb as i32,
        max_kv_blocks: kb as i32,
        tma_q: tma_maps[0],
        tma_k: tma_maps[1],
        tma_v: tma_maps[2],
        tile_counter: if entry == "prefill_ws" { rt.tile_counter()? as *mut i32 } else { std::ptr::null_mut() },
        faults: rt.fault_word() as *mut u32,
    };
    let cfg = if entry.starts_with("prefill_ws") {
        // validate_prefill bounded max_chunks * N * Hq by i32::MAX; the pair grid is at most that.
        // Persistent: one CTA per SM (its shared memory allows no second), never more than tiles.
        let tiles = prefill_ws_grid(plan.max_chunks, batch.num_seqs(), plan.hq) as u32;
        let grid = tiles.min(rt.sm_count());
        LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (WS_THREADS, 1, 1), shared_mem_bytes: smem_bytes }
    } else {
        LaunchConfig { grid_dim: (plan.grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem_bytes }
    };
    // SAFETY: every tensor in `p` was validated above (dtype, shape, bounds of every
    // element, 16-byte alignment of rows); list contents are bounds-checked in the kernel.
    unsafe { rt.stream().launch_builder(&f).arg(&p).launch(cfg)? };
    Ok(())
}

// ---------------------------------------------------------------- decode

/// A paged KV cache. A page is one 64-token chunk of every kv head.
#[derive(Clone, Debug)]
pub struct PagedKv<'a> {
    /// `[P, 64, Hkv, dk]` activation dtype (strided; last dim contiguous).
    pub k_pages: TensorRef<'a>,
    /// `[P, 64, Hkv, dv]`.
    pub v_pages: TensorRef<'a>,
    /// i32 `[N, Ht, max_pages]`: kept page ids per (sequence, table head), any order.
    /// Kv head g uses table head `g / (Hkv / Ht)` (Ht = routing heads in NAtS-L).
    /// Ids outside `[0, P)` are skipped by the kernel.
    pub page_table: TensorRef<'a>,
    /// i32 `[N, Ht]`: entries used (clamped to `[0, max_pages]`).
    pub page_count: TensorRef<'a>,
    /// i32 `[N]`: page of the current, partial chunk.
    pub cur_page: TensorRef<'a>,
    /// i32 `[N]`: tokens in the current page including the new ones (nq..=64).
    pub cur_len: TensorRef<'a>,
}

/// What validation of a decode call found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodePlan {
    pub dtype: natsl_codegen::DType,
    pub dims: HeadDims,
    pub num_seqs: usize,
    pub nq: usize,
    pub hq: usize,
    pub hkv: usize,
    pub ht: usize,
    pub num_pages: usize,
    pub max_pages: usize,
    pub row_tiles: usize,
    pub scale: f32,
    pub smem_bytes: u32,
}

impl DecodePlan {
    /// (num_splits, pages_per_split) for a device of `sm_count` SMs, or as forced.
    pub fn splits(&self, sm_count: u32, force: Option<usize>) -> (usize, usize) {
        let entries = self.max_pages.saturating_add(1);
        let base = self.num_seqs.saturating_mul(self.hkv).saturating_mul(self.row_tiles);
        let want = force.unwrap_or_else(|| (4 * sm_count as usize).div_ceil(base.max(1))).clamp(1, entries);
        let mut pps = entries.div_ceil(want);
        if force.is_none() {
            pps = pps.max(2.min(entries));
        }
        (entries.div_ceil(pps), pps)
    }
}

/// Decode smem bytes: the Q tile and the page ring.
pub fn decode_smem(dims: HeadDims) -> u32 {
    let t = catalog::sparse_decode_tile(dims);
    16 * dims.dk * 2 + t.stages * 64 * (dims.dk + dims.dv) * 2
}

/// Validate a decode call on the host (no GPU needed).
/// Aliasing: none; `o` and `lse` may not overlap each other, the pages or any input.
pub fn validate_decode(q: &TensorRef, nq: usize, kv: &PagedKv, opts: &SparseOptions, o: &TensorRef, lse: Option<&TensorRef>) -> Result<DecodePlan> {
    validate_decode_in(None, q, nq, kv, opts, o, lse)
}

/// [`validate_decode`], also checking that every tensor is memory of context `ctx`.
#[doc(hidden)]
pub fn validate_decode_in(ctx: Option<ContextId>, q: &TensorRef, nq: usize, kv: &PagedKv, opts: &SparseOptions, o: &TensorRef, lse: Option<&TensorRef>) -> Result<DecodePlan> {
    if !(1..=MAX_QUERIES).contains(&nq) {
        return Err(Error::invalid("nq", format!("{nq} queries per sequence: must be 1..={MAX_QUERIES}")));
    }
    q.check_dtype("q", &[DType::Bf16, DType::F16])?;
    q.check_shape("q", &[None, None, None])?;
    q.check_layout("q", 16)?;
    let (rows, hq, dk) = (q.dim(0), q.dim(1), q.dim(2));
    if !rows.is_multiple_of(nq) {
        return Err(Error::invalid("q", format!("{rows} rows is not a multiple of nq = {nq}")));
    }
    let n = rows / nq;
    let kp = &kv.k_pages;
    kp.check_dtype("k_pages", &[q.dtype()])?;
    kp.check_shape("k_pages", &[None, Some(CHUNK), None, Some(dk)])?;
    kp.check_layout("k_pages", 16)?;
    let (np, hkv) = (kp.dim(0), kp.dim(2));
    if !hq.is_multiple_of(hkv) {
        return Err(Error::invalid("k_pages", format!("{hkv} kv heads do not divide {hq} query heads")));
    }
    let vp = &kv.v_pages;
    vp.check_dtype("v_pages", &[q.dtype()])?;
    vp.check_shape("v_pages", &[Some(np), Some(CHUNK), Some(hkv), None])?;
    vp.check_layout("v_pages", 16)?;
    let dv = vp.dim(3);
    let dims = check_dims(dk, dv).map_err(|e| match e {
        Error::InvalidArgument { arg: "v", reason } => Error::invalid("v_pages", reason),
        e => e,
    })?;
    check_i32("page_table", &kv.page_table, &[Some(n), None, None])?;
    let (ht, mp) = (kv.page_table.dim(1), kv.page_table.dim(2));
    if !hkv.is_multiple_of(ht) {
        return Err(Error::invalid("page_table", format!("{ht} table heads do not divide {hkv} kv heads")));
    }
    check_i32("page_count", &kv.page_count, &[Some(n), Some(ht)])?;
    check_i32("cur_page", &kv.cur_page, &[Some(n)])?;
    check_i32("cur_len", &kv.cur_len, &[Some(n)])?;
    o.check_dtype("o", &[q.dtype()])?;
    o.check_shape("o", &[Some(rows), Some(hq), Some(dv)])?;
    o.check_layout("o", 16)?;
    check_lse(lse, rows, hq)?;
    check_norm("q_norm_w", &opts.q_norm_w, q.dtype(), dk)?;
    check_norm("k_norm_w", &opts.k_norm_w, q.dtype(), dk)?;
    let scale = check_scale(opts.scale, dk)?;
    if let Some(s) = opts.num_splits {
        if s == 0 {
            return Err(Error::invalid("num_splits", "must be at least 1"));
        }
    }
    if np > i32::MAX as usize || mp > (i32::MAX as usize) / 2 {
        return Err(Error::invalid("page_table", "too many pages"));
    }
    let row_tiles = (hq / hkv).saturating_mul(nq).div_ceil(16);
    let ctas = (n as u64).saturating_mul(hkv as u64).saturating_mul(row_tiles as u64).saturating_mul(mp as u64 + 1);
    if ctas > i32::MAX as u64 || rows.saturating_mul(hq) > i32::MAX as usize {
        return Err(Error::invalid("q", "problem too large"));
    }
    let mut ops = Operands::new();
    ops.read("q", q).read("k_pages", kp).read("v_pages", vp).read("page_table", &kv.page_table).read("page_count", &kv.page_count);
    ops.read("cur_page", &kv.cur_page).read("cur_len", &kv.cur_len);
    read_norms(&mut ops, opts).write("o", o);
    if let Some(l) = lse {
        ops.write("lse", l);
    }
    ops.check(ctx)?;
    let dtype = q.dtype().activation().unwrap();
    Ok(DecodePlan { dtype, dims, num_seqs: n, nq, hq, hkv, ht, num_pages: np, max_pages: mp, row_tiles, scale, smem_bytes: decode_smem(dims) })
}

/// Split-KV partials (f32 o and lse per split), reusable across calls: natsl's own
/// (grown as needed; [`DecodeWorkspace::reserve`] before a graph capture) or the
/// caller's ([`DecodeWorkspace::from_scratch`], at least [`decode_workspace_bytes`]).
#[derive(Debug, Default)]
pub struct DecodeWorkspace {
    pub scratch: Scratch,
}

impl DecodeWorkspace {
    pub fn new() -> Self {
        Self::default()
    }
    /// A workspace over the caller's memory (never grown by natsl).
    pub fn from_scratch(scratch: Scratch) -> Self {
        DecodeWorkspace { scratch }
    }
    /// Allocate `bytes` now (e.g. [`decode_workspace_bytes`] of the largest step).
    pub fn reserve(&mut self, rt: &Runtime, bytes: usize) -> Result<()> {
        self.scratch.reserve(rt, bytes)
    }
}

/// (part_o, total) bytes of the split-KV partials of `plan` in `splits` splits.
fn decode_ws_layout(plan: &DecodePlan, splits: usize) -> (usize, usize) {
    if splits <= 1 {
        return (0, 0);
    }
    let rows = plan.num_seqs * plan.nq;
    let o = align(splits * rows * plan.hq * plan.dims.dv as usize * 4);
    (o, o + align(splits * rows * plan.hq * 4))
}

/// Workspace bytes a [`decode`] call of `plan` needs on a device of `sm_count` SMs
/// (`num_splits` as in [`SparseOptions`]).
pub fn decode_workspace_bytes(plan: &DecodePlan, sm_count: u32, num_splits: Option<usize>) -> usize {
    decode_ws_layout(plan, plan.splits(sm_count, num_splits).0).1
}

/// Sparse decode: o `[N * nq, Hq, dv]` (lse `[N * nq, Hq]`) for the queries
/// q `[N * nq, Hq, dk]` against `kv`. Queues one kernel (two with split-KV).
/// No aliasing: o and lse may not overlap each other, the pages or any input.
#[allow(clippy::too_many_arguments)]
pub fn decode(rt: &Runtime, q: &TensorRef, nq: usize, kv: &PagedKv, opts: &SparseOptions, o: &mut TensorMut, lse: Option<&mut TensorMut>, ws: &mut DecodeWorkspace) -> Result<()> {
    let ctx = super::launch_context(rt, None)?;
    let plan = validate_decode_in(Some(ctx), q, nq, kv, opts, o.view(), lse.as_deref().map(|l| l.view()))?;
    let (splits, pps) = plan.splits(rt.sm_count(), opts.num_splits);
    let spec = catalog::sparse_decode_spec(plan.dtype, plan.dims, rt.arch());
    let f = rt.function(&spec, "decode", plan.smem_bytes)?;
    let s = rt.stream();
    let rows = plan.num_seqs * nq;
    let (o_bytes, ws_bytes) = decode_ws_layout(&plan, splits);
    let (po, pl) = if splits > 1 {
        let base = ws.scratch.ptr(rt, ws_bytes)?;
        (base, base + o_bytes as u64)
    } else {
        (0, 0)
    };
    let (lse_ptr, lse_st) = lse.as_ref().map_or((std::ptr::null_mut(), 0), |l| (l.ptr() as *mut f32, l.stride(0) as i64));
    let p = NatslSparseDecodeParams {
        q: q.ptr() as *const _,
        q_stride_t: q.stride(0) as i64,
        q_stride_h: q.stride(1) as i64,
        k_pages: kv.k_pages.ptr() as *const _,
        k_stride_page: kv.k_pages.stride(0) as i64,
        k_stride_t: kv.k_pages.stride(1) as i64,
        k_stride_h: kv.k_pages.stride(2) as i64,
        v_pages: kv.v_pages.ptr() as *const _,
        v_stride_page: kv.v_pages.stride(0) as i64,
        v_stride_t: kv.v_pages.stride(1) as i64,
        v_stride_h: kv.v_pages.stride(2) as i64,
        o: o.ptr() as *mut _,
        o_stride_t: o.stride(0) as i64,
        o_stride_h: o.stride(1) as i64,
        lse: lse_ptr,
        lse_stride_t: lse_st,
        q_norm_w: ptr_or_null(&opts.q_norm_w),
        k_norm_w: ptr_or_null(&opts.k_norm_w),
        norm_eps: NORM_EPS,
        scale_log2: plan.scale * std::f32::consts::LOG2_E,
        page_table: kv.page_table.ptr() as *const i32,
        page_count: kv.page_count.ptr() as *const i32,
        cur_page: kv.cur_page.ptr() as *const i32,
        cur_len: kv.cur_len.ptr() as *const i32,
        num_seqs: plan.num_seqs as i32,
        num_queries: nq as i32,
        num_q_heads: plan.hq as i32,
        num_kv_heads: plan.hkv as i32,
        num_table_heads: plan.ht as i32,
        num_pages: plan.num_pages as i32,
        max_pages: plan.max_pages as i32,
        row_tiles: plan.row_tiles as i32,
        num_splits: splits as i32,
        pages_per_split: pps as i32,
        part_o: po as *mut f32,
        part_lse: pl as *mut f32,
        faults: rt.fault_word() as *mut u32,
    };
    let grid = (plan.num_seqs * plan.hkv * plan.row_tiles * splits) as u32;
    // SAFETY: every tensor in `p` was validated above; the workspace holds
    // splits * rows * Hq (* dv) f32; page ids and lengths are bounds-checked in the kernel.
    unsafe {
        s.launch_builder(&f).arg(&p).launch(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: plan.smem_bytes })?;
        if splits > 1 {
            let fc = rt.function(&spec, "combine", 0)?;
            s.launch_builder(&fc).arg(&p).launch(LaunchConfig { grid_dim: ((rows * plan.hq) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })?;
        }
    }
    Ok(())
}
