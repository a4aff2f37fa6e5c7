//! The fused router (SPEC.md section 3): per chunk mean-pool of `x`, logits
//! `W_score · m_c`, labels by the argmax policy or a top-k budget, and the
//! compact, sorted per-(sequence, routing head) lists of ATTN chunks that the
//! sparse softmax consumes. One launch on the runtime's stream, no host
//! round trip.

use crate::batch::{Batch, SeqLayout};
use crate::error::{Error, Result};
use crate::params::{NatslRouterParams, NATSL_ROUTER_MAX_HEADS, NATSL_ROUTER_STREAM_COLS, NATSL_ROUTER_STREAM_STAGES};
use crate::runtime::Runtime;
use crate::tensor::{DType, TensorRef};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use natsl_codegen::{catalog, Sparsity};

/// Largest model width the score kernel accepts.
pub const MAX_D_MODEL: usize = 8192;
/// Largest number of routing heads.
pub const MAX_HEADS: usize = 64;
/// Largest compile-time k (larger k use the run-time path).
pub const MAX_COMPILE_K: usize = 1024;

const THREADS: u32 = catalog::ROUTER_TILE.warps * 32;

/// How chunks are labelled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RouterPolicy {
    /// The model's own rule: ATTN iff l0 >= l1. No budget.
    Argmax,
    /// Keep the k complete chunks with the largest margin l0 - l1, per (sequence, head).
    TopK(usize),
    /// Keep k = ceil(rho * complete chunks) per (sequence, head); 0 < rho <= 1.
    KeepFraction(f32),
}

/// Router options.
#[derive(Clone, Copy, Debug)]
pub struct RouterOptions {
    pub policy: RouterPolicy,
    /// Round m_c to the activation dtype before scoring, like the reference model (default true).
    pub round_mean: bool,
    /// With `TopK(k)`, use an image specialised for this k (codegen) instead of the run-time k.
    pub compile_time_k: bool,
    /// One fused launch (the last CTA of each sequence selects) or two launches.
    pub launch: RouterLaunch,
    /// Tuning knob: CTAs per chunk along D (`None` = chosen to fill the GPU).
    /// Each CTA pools at most 2048 columns, so at least ceil(D / 2048).
    /// With `PoolKernel::Streaming`: at most ceil(D / 256) (whole 256-column tiles per split).
    pub d_split: Option<usize>,
    /// Which pooling kernel runs (both feed the same select paths).
    pub pool: PoolKernel,
}

/// The pool + score kernel. Both give the same outputs up to f32 summation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PoolKernel {
    /// One CTA per (chunk, D split): load, reduce, score (today's default).
    #[default]
    Blocked,
    /// A persistent grid (occupancy-sized, ~2 CTAs per SM) streaming 64 x 256
    /// tiles through a 3-stage cp.async ring, pooling one tile while the next
    /// two load. Experimental, off by default.
    Streaming,
}

/// How the router is launched. Both give identical results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterLaunch {
    /// Chosen by size (see `route_into`).
    Auto,
    /// Pool+score, then in the same kernel the last CTA of a sequence selects.
    Fused,
    /// A pool+score kernel, then a select kernel (one warp per head).
    Split,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions { policy: RouterPolicy::Argmax, round_mean: true, compile_time_k: false, launch: RouterLaunch::Auto, d_split: None, pool: PoolKernel::Blocked }
    }
}

/// Router outputs (and workspace), reusable across calls of the same batch shape.
#[derive(Debug)]
pub struct RouterOutput {
    /// `[num_slots, num_heads]`: NATSL_LABEL_{GDN, ATTN, PARTIAL}.
    pub labels: CudaSlice<u8>,
    /// `[num_heads, num_slots]`: the list of (n, r) starts at `r * num_slots + slot_base(n)`.
    pub attn_list: CudaSlice<i32>,
    /// `[num_seqs, num_heads]`.
    pub attn_count: CudaSlice<i32>,
    /// `[num_slots, num_heads, 2]` f32, if asked for.
    pub logits: Option<CudaSlice<f32>>,
    workspace: CudaSlice<f32>,
    margins: CudaSlice<f32>,
    /// Per-sequence completion counters; the kernel leaves them at zero.
    seq_done: CudaSlice<i32>,
    num_heads: usize,
    num_slots: usize,
    num_seqs: usize,
}

impl RouterOutput {
    /// Allocate outputs for `batch` and `num_heads` routing heads.
    pub fn alloc(rt: &Runtime, batch: &Batch, num_heads: usize, d_model: usize, with_logits: bool) -> Result<RouterOutput> {
        let s = rt.stream();
        let ns = batch.num_slots();
        let (d_split, _) = d_split(rt, ns, d_model.max(8), None);
        Ok(RouterOutput {
            labels: s.alloc_zeros(ns * num_heads)?,
            attn_list: s.alloc_zeros(ns * num_heads)?,
            attn_count: s.alloc_zeros(batch.num_seqs() * num_heads)?,
            logits: if with_logits { Some(s.alloc_zeros(ns * num_heads * 2)?) } else { None },
            workspace: s.alloc_zeros(d_split * ns * num_heads * 2)?,
            margins: s.alloc_zeros(ns * num_heads)?,
            seq_done: s.alloc_zeros(batch.num_seqs())?,
            num_heads,
            num_slots: ns,
            num_seqs: batch.num_seqs(),
        })
    }
}

/// Split D so that (chunks x splits) fills the GPU, with at most 8 * THREADS
/// columns per CTA (one 16-byte group per thread) and at least 256.
fn d_split(rt: &Runtime, num_slots: usize, d_model: usize, forced: Option<usize>) -> (usize, usize) {
    let max_cols = 8 * THREADS as usize;
    let min_split = d_model.div_ceil(max_cols);
    let want = (4 * rt.sm_count() as usize).div_ceil(num_slots.max(1));
    let split = forced.unwrap_or(want).clamp(min_split, (d_model / 8).max(min_split));
    let split = if forced.is_some() { split } else { split.min((d_model / 256).max(min_split)) };
    let per = d_model.div_ceil(split).div_ceil(8) * 8;
    (d_model.div_ceil(per), per)
}

/// Columns per streaming tile, ring stages, and the streaming kernel's dynamic shared memory
/// (must match STREAM_SMEM_BYTES in cuda/router/stream.cuh).
const STREAM_COLS: usize = NATSL_ROUTER_STREAM_COLS as usize;
const STREAM_SMEM: u32 = NATSL_ROUTER_STREAM_STAGES * 64 * NATSL_ROUTER_STREAM_COLS * 2 + (3 * NATSL_ROUTER_STREAM_COLS + 2 * NATSL_ROUTER_MAX_HEADS) * 4;
const _: () = assert!(NATSL_ROUTER_MAX_HEADS as usize == MAX_HEADS);

/// Streaming D split: whole 256-column tiles per split. Returns (d_split, d_per_split, grid)
/// for a persistent grid of at most `max_ctas` CTAs: the fewest splits whose busiest CTA
/// has at most 5% more tiles than the best split count's.
fn stream_split(num_slots: usize, d_model: usize, max_ctas: usize, forced: Option<usize>) -> (usize, usize, usize) {
    let tiles = d_model.div_ceil(STREAM_COLS);
    let max_ctas = max_ctas.max(1);
    let shape = |s: usize| {
        let per_tiles = tiles.div_ceil(s.clamp(1, tiles));
        let split = tiles.div_ceil(per_tiles);
        let items = (num_slots * split).max(1);
        let grid = if items <= max_ctas { items } else { (max_ctas / split).max(1) * split };
        (split, per_tiles, grid, items.div_ceil(grid) * per_tiles)
    };
    let s = match forced {
        Some(f) => f.clamp(1, tiles),
        None => {
            let best = (1..=tiles).map(|s| shape(s).3).min().unwrap_or(1);
            (1..=tiles).find(|&s| shape(s).3 * 100 <= best * 105).unwrap_or(1)
        }
    };
    let (split, per_tiles, grid, _) = shape(s);
    (split, (per_tiles * STREAM_COLS).min(d_model.div_ceil(8) * 8), grid)
}

/// Run the router, allocating the outputs.
pub fn route(rt: &Runtime, batch: &Batch, x: &TensorRef, w_score: &TensorRef, opts: &RouterOptions) -> Result<RouterOutput> {
    let hr = w_score.dim(0) / 2;
    let mut out = RouterOutput::alloc(rt, batch, hr, x.dim(1), false)?;
    route_into(rt, batch, x, w_score, opts, &mut out)?;
    Ok(out)
}

/// What validation derives from the arguments.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterPlan {
    pub d_model: usize,
    pub num_heads: usize,
    /// 0 = argmax, > 0 = k, -1 = keep fraction.
    pub top_k: i32,
    pub keep_fraction: f32,
    pub sparsity: Sparsity,
}

/// Check every argument of a router call; needs no device.
pub fn validate(layout: &SeqLayout, x: &TensorRef, w_score: &TensorRef, opts: &RouterOptions) -> Result<RouterPlan> {
    x.check_dtype("x", &[DType::Bf16, DType::F16])?;
    x.check_shape("x", &[None, None])?;
    x.check_layout("x", 16)?;
    layout.check_tokens("x", x.dim(0))?;
    let d = x.dim(1);
    if d % 8 != 0 || d > MAX_D_MODEL {
        return Err(Error::invalid("x", format!("d_model {d} must be a multiple of 8 and at most {MAX_D_MODEL}")));
    }
    w_score.check_dtype("w_score", &[x.dtype()])?;
    w_score.check_shape("w_score", &[None, Some(d)])?;
    w_score.check_contiguous("w_score")?;
    w_score.check_layout("w_score", 16)?;
    let rows = w_score.dim(0);
    if rows % 2 != 0 || rows / 2 > MAX_HEADS {
        return Err(Error::invalid("w_score", format!("{rows} rows: must be 2 * num_heads with num_heads <= {MAX_HEADS}")));
    }
    let min_complete = layout.min_complete_chunks();
    let (top_k, keep_fraction, sparsity) = match opts.policy {
        RouterPolicy::Argmax => (0, 0.0, Sparsity::Dense),
        RouterPolicy::TopK(k) => {
            if k == 0 {
                return Err(Error::invalid("policy", "TopK(0): k must be at least 1"));
            }
            if k > min_complete {
                return Err(Error::invalid("policy", format!("TopK({k}): a sequence of the batch has only {min_complete} complete chunks")));
            }
            let sp = if opts.compile_time_k && k <= MAX_COMPILE_K { Sparsity::TopK(k as u32) } else { Sparsity::TopKRuntime };
            (k as i32, 0.0, sp)
        }
        RouterPolicy::KeepFraction(rho) => {
            if !(rho > 0.0 && rho <= 1.0) {
                return Err(Error::invalid("policy", format!("KeepFraction({rho}): must be in (0, 1]")));
            }
            (-1, rho, Sparsity::TopKRuntime)
        }
    };
    Ok(RouterPlan { d_model: d, num_heads: rows / 2, top_k, keep_fraction, sparsity })
}

/// Run the router into preallocated outputs.
pub fn route_into(rt: &Runtime, batch: &Batch, x: &TensorRef, w_score: &TensorRef, opts: &RouterOptions, out: &mut RouterOutput) -> Result<()> {
    let RouterPlan { d_model: d, num_heads: hr, top_k, keep_fraction, sparsity } = validate(batch.layout(), x, w_score, opts)?;
    if out.num_heads != hr || out.num_slots != batch.num_slots() || out.num_seqs != batch.num_seqs() {
        return Err(Error::invalid("out", format!("allocated for {} heads / {} slots / {} sequences; this call needs {hr} / {} / {}", out.num_heads, out.num_slots, out.num_seqs, batch.num_slots(), batch.num_seqs())));
    }
    let dtype = x.dtype().activation().unwrap();
    let spec = catalog::router_spec(dtype, sparsity, rt.arch());
    let fused = match opts.launch {
        RouterLaunch::Fused => true,
        RouterLaunch::Split => false,
        RouterLaunch::Auto => hr <= 8 && !(129..512).contains(&batch.max_chunks()),
    };
    // Streaming: the persistent grid is as many CTAs as fit (occupancy), then split D.
    let stream = match opts.pool {
        PoolKernel::Blocked => None,
        PoolKernel::Streaming => {
            let f = rt.function(&spec, if fused { "stream_route" } else { "stream_score" }, STREAM_SMEM)?;
            let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(THREADS, STREAM_SMEM as usize, None)? as usize;
            if per_sm == 0 {
                return Err(Error::Unsupported(format!("streaming router pool needs {STREAM_SMEM} bytes of shared memory per CTA; the device fits none")));
            }
            let (split, per, grid) = stream_split(batch.num_slots(), d, per_sm * rt.sm_count() as usize, opts.d_split);
            Some((f, split, per, grid))
        }
    };
    let (split, per) = match &stream {
        Some((_, split, per, _)) => (*split, *per),
        None => d_split(rt, batch.num_slots(), d, opts.d_split),
    };
    if out.workspace.len() < split * batch.num_slots() * hr * 2 {
        out.workspace = rt.stream().alloc_zeros(split * batch.num_slots() * hr * 2)?;
    }
    // ---- launch ----
    let score_smem = THREADS * 8 * 4 + per as u32 * 4;
    // Measured on the H200 (bench/results/2026-11-28-h200-c-natsl.jsonl, graph
    // replays): with <= 8 heads the fused launch won at 64, 512 and 2048 chunks
    // (8.9 vs 9.5, 36.7 vs 41.1, 113 vs 128 us) but lost at 256 (24.7 vs 21.6 us);
    // with 32 heads its one-CTA select tail lost everywhere (119 vs 96 us at 16k).
    // (`fused` is decided above, before the streaming kernel is looked up.)
    let s = rt.stream();
    let (labels, _g1) = out.labels.device_ptr_mut(s);
    let (list, _g2) = out.attn_list.device_ptr_mut(s);
    let (count, _g3) = out.attn_count.device_ptr_mut(s);
    let (ws, _g4) = out.workspace.device_ptr_mut(s);
    let (margins, _g5) = out.margins.device_ptr_mut(s);
    let (seq_done, _g6) = out.seq_done.device_ptr_mut(s);
    let logits = match out.logits.as_mut() {
        Some(l) => l.device_ptr_mut(s).0,
        None => 0,
    };
    let p = NatslRouterParams {
        batch: batch.raw(),
        x: x.ptr() as *const _,
        x_stride_t: x.stride(0) as i64,
        w_score: w_score.ptr() as *const _,
        d_model: d as i32,
        num_heads: hr as i32,
        d_split: split as i32,
        d_per_split: per as i32,
        round_mean: opts.round_mean as i32,
        top_k,
        keep_fraction,
        partial_logits: ws as *mut f32,
        margins: margins as *mut f32,
        seq_done: seq_done as *mut i32,
        logits: logits as *mut f32,
        labels: labels as *mut u8,
        attn_list: list as *mut i32,
        attn_count: count as *mut i32,
    };
    let num_slots = p.batch.num_slots as u32;
    // SAFETY: every pointer in `p` was validated above (shapes, bounds, alignment)
    // or allocated here for exactly this batch; the kernel reads `p` by value.
    unsafe {
        if let Some((f, _, _, grid)) = &stream {
            let cfg = LaunchConfig { grid_dim: (*grid as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: STREAM_SMEM };
            s.launch_builder(f).arg(&p).launch(cfg)?;
            if !fused {
                let f_select = rt.function(&spec, "select", 0)?;
                let warps = THREADS / 32;
                s.launch_builder(&f_select).arg(&p).launch(LaunchConfig { grid_dim: (batch.num_seqs() as u32, (hr as u32).div_ceil(warps), 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })?;
            }
        } else if fused {
            let f = rt.function(&spec, "route", score_smem)?;
            s.launch_builder(&f).arg(&p).launch(LaunchConfig { grid_dim: (num_slots, split as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: score_smem })?;
        } else {
            let f_score = rt.function(&spec, "score", score_smem)?;
            let f_select = rt.function(&spec, "select", 0)?;
            let warps = THREADS / 32;
            s.launch_builder(&f_score).arg(&p).launch(LaunchConfig { grid_dim: (num_slots, split as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: score_smem })?;
            s.launch_builder(&f_select).arg(&p).launch(LaunchConfig { grid_dim: (batch.num_seqs() as u32, (hr as u32).div_ceil(warps), 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })?;
        }
    }
    let _ = out.logits.as_ref().map(|l| l.device_ptr(s));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::stream_split;

    #[test]
    fn stream_split_covers_d_with_whole_tiles() {
        for &(ns, d, ctas) in &[(257usize, 1024usize, 264usize), (1025, 4096, 264), (2049, 1024, 264), (65, 1024, 264), (7, 104, 264), (95, 8192, 132), (1, 8, 1)] {
            for forced in [None, Some(0), Some(1), Some(5), Some(1000)] {
                let (split, per, grid) = stream_split(ns, d, ctas, forced);
                assert!(split >= 1 && per % 8 == 0 && per > 0, "{ns} {d} {forced:?}");
                assert!(per % 256 == 0 || split == 1, "{ns} {d} {forced:?}: per {per}");
                assert!((split - 1) * per < d && split * per >= d, "{ns} {d} {forced:?}: {split} x {per}");
                assert!(grid >= 1 && grid <= (ns * split).max(1) && grid <= ctas.max(split), "{ns} {d} {forced:?}: grid {grid}");
                assert!(grid == ns * split || grid % split == 0, "a CTA keeps one D split");
            }
        }
        // Long sequences: one split (few partials for the select), about 4 items per CTA.
        assert_eq!(stream_split(1025, 4096, 264, None).0, 1);
        assert_eq!(stream_split(65, 1024, 264, None).0, 4);
    }
}
