//! The router (SPEC.md section 3): per chunk mean-pool of `x`, logits
//! `W_score · m_c`, labels by the argmax policy or a top-k budget, and the
//! compact, sorted per-(sequence, routing head) lists of ATTN chunks that the
//! sparse softmax consumes. Two launches on the runtime's stream (pool + score,
//! then select), no host round trip.

use crate::batch::{Batch, SeqLayout};
use crate::error::{Error, Result};
use crate::params::{NatslRouterParams, NATSL_ROUTER_MAX_HEADS, NATSL_ROUTER_TILE_COLS};
use crate::runtime::Runtime;
use crate::tensor::{ContextId, DType, Operands, TensorRef};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use natsl_codegen::{catalog, Sparsity};

/// Largest model width the score kernel accepts.
pub const MAX_D_MODEL: usize = 8192;
/// Largest number of routing heads.
pub const MAX_HEADS: usize = 64;
/// Largest compile-time k (larger k use the run-time path).
pub const MAX_COMPILE_K: usize = 1024;

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
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions { policy: RouterPolicy::Argmax, round_mean: true, compile_time_k: false }
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
    num_heads: usize,
    num_slots: usize,
    num_seqs: usize,
}

impl RouterOutput {
    /// Allocate outputs for `batch` and `num_heads` routing heads (1..=64) of a model
    /// of width `d_model` (8..=8192).
    pub fn alloc(rt: &Runtime, batch: &Batch, num_heads: usize, d_model: usize, with_logits: bool) -> Result<RouterOutput> {
        if num_heads == 0 || num_heads > MAX_HEADS {
            return Err(Error::invalid("num_heads", format!("{num_heads}: must be 1..={MAX_HEADS}")));
        }
        if d_model == 0 || d_model > MAX_D_MODEL {
            return Err(Error::invalid("d_model", format!("{d_model}: must be 1..={MAX_D_MODEL}")));
        }
        super::launch_context(rt, Some(batch))?;
        let s = rt.stream();
        let ns = batch.num_slots();
        // The partial logits of every slice (no allocation inside a capture).
        let d_split = d_model.max(8).div_ceil(TILE_COLS);
        // ns < 2^26 (i32 tokens), heads <= 64, d_split <= 32: no product overflows.
        Ok(RouterOutput {
            labels: s.alloc_zeros(ns * num_heads)?,
            attn_list: s.alloc_zeros(ns * num_heads)?,
            attn_count: s.alloc_zeros(batch.num_seqs() * num_heads)?,
            logits: if with_logits { Some(s.alloc_zeros(ns * num_heads * 2)?) } else { None },
            workspace: s.alloc_zeros(d_split * ns * num_heads * 2)?,
            margins: s.alloc_zeros(ns * num_heads)?,
            num_heads,
            num_slots: ns,
            num_seqs: batch.num_seqs(),
        })
    }
}

/// Columns per pool CTA, and the CTA sizes of the two launches (cuda/router/router.cuh).
/// One 128-thread CTA per (chunk, 256-column slice) issues its whole 32 KB tile of
/// loads at once; the select runs one CTA per (sequence, head). (The blocked pool, one
/// CTA per (chunk, D split) with a warp-per-head select, was removed: slower at every
/// measured shape, H200 2026-12-03 run f: 16k x 1024 21.5 vs 15.2 us, 131k 128.2 vs 73.8.)
const TILE_COLS: usize = NATSL_ROUTER_TILE_COLS as usize;
const TILE_THREADS: u32 = 128;
const TILE_SELECT_THREADS: u32 = 512;
const _: () = assert!(NATSL_ROUTER_MAX_HEADS as usize == MAX_HEADS);

/// Run the router, allocating the outputs (sized from the validated arguments).
pub fn route(rt: &Runtime, batch: &Batch, x: &TensorRef, w_score: &TensorRef, opts: &RouterOptions) -> Result<RouterOutput> {
    let plan = validate_in(Some(super::launch_context(rt, Some(batch))?), batch.layout(), x, w_score, opts)?;
    let mut out = RouterOutput::alloc(rt, batch, plan.num_heads, plan.d_model, false)?;
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

/// Check every argument of a router call; needs no device. The router writes only
/// its own [`RouterOutput`]; x and w_score are read.
pub fn validate(layout: &SeqLayout, x: &TensorRef, w_score: &TensorRef, opts: &RouterOptions) -> Result<RouterPlan> {
    validate_in(None, layout, x, w_score, opts)
}

/// [`validate`], also checking that x and w_score are memory of context `ctx`.
#[doc(hidden)]
pub fn validate_in(ctx: Option<ContextId>, layout: &SeqLayout, x: &TensorRef, w_score: &TensorRef, opts: &RouterOptions) -> Result<RouterPlan> {
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
    Operands::new().read("x", x).read("w_score", w_score).check(ctx)?;
    Ok(RouterPlan { d_model: d, num_heads: rows / 2, top_k, keep_fraction, sparsity })
}

/// Run the router into preallocated outputs (of this runtime, for this batch shape).
/// No aliasing: x and w_score may not overlap the outputs.
pub fn route_into(rt: &Runtime, batch: &Batch, x: &TensorRef, w_score: &TensorRef, opts: &RouterOptions, out: &mut RouterOutput) -> Result<()> {
    let ctx = super::launch_context(rt, Some(batch))?;
    let RouterPlan { d_model: d, num_heads: hr, top_k, keep_fraction, sparsity } = validate_in(Some(ctx), batch.layout(), x, w_score, opts)?;
    if out.num_heads != hr || out.num_slots != batch.num_slots() || out.num_seqs != batch.num_seqs() {
        return Err(Error::invalid("out", format!("allocated for {} heads / {} slots / {} sequences; this call needs {hr} / {} / {}", out.num_heads, out.num_slots, out.num_seqs, batch.num_slots(), batch.num_seqs())));
    }
    {
        // The outputs are our own allocations: only x or w_score made from raw
        // pointers could overlap them.
        let mut ops = Operands::new();
        ops.read("x", x).read("w_score", w_score);
        let all = [&out.labels as &dyn AsView, &out.attn_list, &out.attn_count, &out.workspace, &out.margins];
        for v in all.iter().map(|b| b.view()).chain(out.logits.as_ref().map(|l| TensorRef::new(l, &[l.len()]))) {
            ops.write("out", &v);
        }
        ops.check(Some(ctx))?;
    }
    let split = split_for(rt.sm_count(), batch.num_slots(), d, opts).0;
    if out.workspace.len() < split * batch.num_slots() * hr * 2 {
        out.workspace = rt.stream().alloc_zeros(split * batch.num_slots() * hr * 2)?;
    }
    let s = rt.stream();
    let (labels, _g1) = out.labels.device_ptr_mut(s);
    let (attn_list, _g2) = out.attn_list.device_ptr_mut(s);
    let (attn_count, _g3) = out.attn_count.device_ptr_mut(s);
    let (partial_logits, _g4) = out.workspace.device_ptr_mut(s);
    let (margins, _g5) = out.margins.device_ptr_mut(s);
    let logits = match out.logits.as_mut() {
        Some(l) => l.device_ptr_mut(s).0,
        None => 0,
    };
    let targets = RouterTargets { labels, attn_list, attn_count, logits, partial_logits, margins };
    let plan = RouterPlan { d_model: d, num_heads: hr, top_k, keep_fraction, sparsity };
    // SAFETY: the targets are this RouterOutput's buffers, allocated by natsl for this
    // batch shape and head count (checked above), the partials grown to this call's split.
    unsafe { launch(rt, batch, x, w_score, opts, &plan, &targets)? };
    let _ = out.logits.as_ref().map(|l| l.device_ptr(s));
    Ok(())
}

/// (CTAs along D, columns per CTA) of the pool: one CTA per 256-column slice.
fn split_for(_sm_count: u32, _num_slots: usize, d_model: usize, _opts: &RouterOptions) -> (usize, usize) {
    (d_model.div_ceil(TILE_COLS), TILE_COLS)
}

/// f32 partial logits a launch of `opts` needs (`RouterTargets::partial_logits`).
pub(crate) fn partials_len(sm_count: u32, num_slots: usize, d_model: usize, num_heads: usize, opts: &RouterOptions) -> usize {
    split_for(sm_count, num_slots, d_model, opts).0.saturating_mul(num_slots).saturating_mul(num_heads).saturating_mul(2)
}

/// The device memory a router launch writes, laid out as in [`RouterOutput`]:
/// labels u8 `[num_slots, Hr]`, attn_list i32 `[Hr, num_slots]`, attn_count i32
/// `[N, Hr]`, logits f32 `[num_slots, Hr, 2]` (0: not written), the partial logits
/// ([`partials_len`] f32) and the margins f32 `[num_slots, Hr]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RouterTargets {
    pub labels: u64,
    pub attn_list: u64,
    pub attn_count: u64,
    pub logits: u64,
    pub partial_logits: u64,
    pub margins: u64,
}

/// Queue the router's two launches on the runtime's stream (no validation: `plan` is
/// what [`validate_in`] returned for these x, w_score and opts).
///
/// # Safety
/// Every target address must be device memory of `rt`'s context, 4-byte aligned, hold
/// the layout of [`RouterTargets`] for `batch` and `plan.num_heads`, overlap neither x,
/// w_score nor another target, and stay untouched by others until the launches end.
pub(crate) unsafe fn launch(rt: &Runtime, batch: &Batch, x: &TensorRef, w_score: &TensorRef, opts: &RouterOptions, plan: &RouterPlan, t: &RouterTargets) -> Result<()> {
    let RouterPlan { d_model: d, num_heads: hr, top_k, keep_fraction, sparsity } = *plan;
    let dtype = x.dtype().activation().ok_or_else(|| Error::invalid("x", "not an activation dtype"))?;
    let spec = catalog::router_spec(dtype, sparsity, rt.arch());
    let (split, per) = split_for(rt.sm_count(), batch.num_slots(), d, opts);
    // ---- launch ----
    // Two launches (pool + score, then select). A fused launch, whose last CTAs of a
    // sequence selected, was removed: the tiled one spin-waited on a counter (a hang
    // where its CTAs are not all resident, e.g. under MIG or MPS), and the split
    // launch was faster at every measured shape of the tiled pool (H200 run e:
    // 16k 15.7 vs 17.1 us, 131k 82.0 vs 95.3 us, 16k x 4096 x 32 heads 56.1 vs 75.8 us).
    let s = rt.stream();
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
        partial_logits: t.partial_logits as *mut f32,
        margins: t.margins as *mut f32,
        logits: t.logits as *mut f32,
        labels: t.labels as *mut u8,
        attn_list: t.attn_list as *mut i32,
        attn_count: t.attn_count as *mut i32,
    };
    let num_slots = p.batch.num_slots as u32;
    // SAFETY: x and w_score were validated (shapes, bounds, alignment); the targets are
    // the caller's promise (see above); the kernel reads `p` by value.
    unsafe {
        let grid = (num_slots * split as u32, 1, 1);
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (TILE_THREADS, 1, 1), shared_mem_bytes: 0 };
        let f_score = rt.function(&spec, "tile_score", 0)?;
        let f_select = rt.function(&spec, "tile_select", 0)?;
        s.launch_builder(&f_score).arg(&p).launch(cfg)?;
        s.launch_builder(&f_select).arg(&p).launch(LaunchConfig { grid_dim: (batch.num_seqs() as u32, hr as u32, 1), block_dim: (TILE_SELECT_THREADS, 1, 1), shared_mem_bytes: 0 })?;
    }
    Ok(())
}

/// A whole output buffer as a 1-D view (for the aliasing and context checks).
trait AsView {
    fn view(&self) -> TensorRef<'_>;
}
impl<T: crate::tensor::Element> AsView for CudaSlice<T> {
    fn view(&self) -> TensorRef<'_> {
        TensorRef::new(self, &[self.len()])
    }
}
