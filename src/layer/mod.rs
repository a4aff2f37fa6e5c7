//! The NAtS-L layer (SPEC.md sections 3-6) as one call: [`prefill`] runs the router,
//! then the GDN branch and the block-sparse softmax branch side by side on two
//! streams, then the merge epilogue, and returns the layer output (before o_proj)
//! with what a cache keeps: the final GDN states, the chunk labels and the lists of
//! kept (ATTN) chunks.
//!
//! # Streams and CUDA graphs
//! Everything is queued behind the work already on the runtime's stream and ends
//! before the work queued after the call: the softmax branch runs on a second stream
//! of the [`PrefillWorkspace`], forked from and joined back to the runtime's stream
//! with events. That is the fork/join pattern stream capture records, so the whole call
//! can be captured into a CUDA graph on the runtime's stream. Before capturing, run the
//! call once (it loads the kernels, creates the second stream and grows natsl's
//! workspace), or load the units ([`crate::Runtime::warmup`]) and
//! [`PrefillWorkspace::reserve`] the workspace: inside a capture the call allocates
//! nothing and creates no stream, and says so with an error naming `workspace` instead.
//!
//! # Validation
//! [`validate_prefill`] (no device needed) checks every argument the way each op's own
//! validation does (the same functions run), then the rules that tie the ops together:
//! the softmax heads tile the GDN heads, the router has one routing head per GDN head,
//! and no output overlaps any tensor of the call. Errors name the argument.

mod validate;
mod workspace;

pub use validate::{validate_prefill, validate_prefill_in, LayerPlan};
pub use workspace::{prefill_workspace_bytes, prefill_workspace_bytes_for, PrefillWorkspace};

use crate::batch::Batch;
use crate::error::Result;
use crate::ops::gdn::{self, GdnOptions, GdnWorkspace, PoolOut};
use crate::ops::merge::{self, MergeInputs};
use crate::ops::router::{self, RouterOptions, RouterTargets};
use crate::ops::sparse::{self, BlockMask, SparseOptions};
use crate::runtime::Runtime;
use crate::tensor::{TensorMut, TensorRef};
use crate::workspace::Scratch;
use cudarc::driver::sys::CUstreamCaptureStatus;
use natsl_codegen::catalog;

/// The inputs of one layer prefill over a packed batch of `T` tokens. Activation
/// tensors are bf16 or f16 (one dtype for all), any token and head strides with the
/// last dim contiguous (views into the packed projection outputs are the intended use).
#[derive(Clone, Debug)]
pub struct PrefillInputs<'a> {
    /// `[T, H, dk]`: the GDN queries; softmax head j reads the j-th dks-wide slice of a
    /// token's row, so with more softmax than GDN heads the H heads must be packed
    /// (head stride dk).
    pub q: TensorRef<'a>,
    /// `[T, H, dk]`, as q.
    pub k: TensorRef<'a>,
    /// `[T, H, dv]`, as q (packed heads: head stride dv).
    pub v: TensorRef<'a>,
    /// `[T, H]` f32 log-decay (g <= 0).
    pub g: TensorRef<'a>,
    /// `[T, H]` f32 or the activation dtype.
    pub beta: TensorRef<'a>,
    /// `[T, D]`: the router's input (the layer input after the block's pre-norm).
    pub x: TensorRef<'a>,
    /// `[2 H, D]`, contiguous: one routing head per GDN head.
    pub w_score: TensorRef<'a>,
    /// `[T, Ha, 2]` merge weight logits, f32 or the activation dtype.
    pub w: TensorRef<'a>,
    /// `[dvs]`, contiguous.
    pub gamma_gdn: TensorRef<'a>,
    /// `[dvs]`, contiguous.
    pub gamma_att: TensorRef<'a>,
    /// `[T, Ha, dvs]`: the output gate. Its shape gives the softmax heads: Ha heads of
    /// dvs = H dv / Ha, and dks = H dk / Ha.
    pub z: TensorRef<'a>,
}

/// What one layer prefill writes. Outputs left `None` are not written; router outputs
/// left `None` live in the workspace for the duration of the call.
#[derive(Debug)]
pub struct PrefillOutputs<'a> {
    /// `[T, Ha, dvs]`, the activation dtype: the layer output before o_proj.
    pub out: TensorMut<'a>,
    /// Committed GDN states: f32 pool `[P, H, dk, dv]` (see [`PoolOut`]).
    pub committed: Option<PoolOut<'a>>,
    /// Running GDN states (differ from the committed ones where the last chunk is partial).
    pub running: Option<PoolOut<'a>>,
    /// `[N, H]` f32: sum of g over each sequence's last, partial chunk.
    pub gsum_running: Option<TensorMut<'a>>,
    /// `[num_slots, H]` u8: the chunk labels (`NATSL_LABEL_*`).
    pub labels: Option<TensorMut<'a>>,
    /// `[H, num_slots]` i32: the sorted lists of ATTN chunks (see `RouterOutput`).
    pub attn_list: Option<TensorMut<'a>>,
    /// `[N, H]` i32: the length of each list.
    pub attn_count: Option<TensorMut<'a>>,
}

impl<'a> PrefillOutputs<'a> {
    /// Only the layer output.
    pub fn new(out: TensorMut<'a>) -> Self {
        PrefillOutputs { out, committed: None, running: None, gsum_running: None, labels: None, attn_list: None, attn_count: None }
    }
}

/// Where the softmax branch runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Streams {
    /// The softmax branch on the workspace's second stream, overlapping the GDN branch.
    #[default]
    Two,
    /// Every launch on the runtime's stream, in order (for comparison and debugging).
    One,
}

/// Options of a layer prefill: each op's own options, and the streams.
#[derive(Clone, Debug)]
pub struct PrefillOptions<'a> {
    pub router: RouterOptions,
    /// Default: the model's in-kernel L2 norm of q and k, scale dk^-1/2.
    pub gdn: GdnOptions,
    /// Softmax scale, q/k RMSNorm weights and the prefill kernel (`num_splits` is a
    /// decode option and ignored here).
    pub sparse: SparseOptions<'a>,
    pub streams: Streams,
}

impl Default for PrefillOptions<'_> {
    fn default() -> Self {
        PrefillOptions { router: RouterOptions::default(), gdn: GdnOptions { scale: None, l2norm: true }, sparse: SparseOptions::default(), streams: Streams::Two }
    }
}

/// An output view handed on to one op while the layer holds the caller's `&mut` (or,
/// for validation and sizing, a shared borrow: such a view is never launched on).
pub(crate) fn alias_mut<'a>(t: &TensorRef<'a>) -> TensorMut<'a> {
    // SAFETY: the same memory, shape and strides as a view the caller made; the layer
    // uses it only inside the call that borrows the original.
    let mut m = unsafe { TensorMut::from_raw(t.ptr(), t.avail(), t.dtype(), t.shape(), t.strides()) };
    m.set_context(t.context());
    m
}

pub(crate) fn alias_pool<'a>(p: &Option<PoolOut<'a>>) -> Option<PoolOut<'a>> {
    p.as_ref().map(|p| PoolOut { pool: alias_mut(p.pool.view()), index: p.index.clone() })
}

/// The layer prefill: router, then the GDN and softmax branches (overlapped, see
/// [`Streams`]), then the merge, queued on `rt`'s stream; no host synchronisation.
///
/// Everything that can fail on the host is settled before the first launch: every
/// argument is validated (see [`validate_prefill`]), the kernels are chosen and their
/// units loaded (or compiled, on first use), the workspace is checked (or grown) and the
/// second stream exists. After that only a driver error can fail the call, and it
/// leaves the outputs undefined.
///
/// `ws`: natsl's own memory (grown on demand) or the caller's ([`PrefillWorkspace::from_scratch`],
/// at least [`prefill_workspace_bytes`]); it must not overlap any tensor of the call.
pub fn prefill(rt: &Runtime, batch: &Batch, inp: &PrefillInputs, out: &mut PrefillOutputs, opts: &PrefillOptions, ws: &mut PrefillWorkspace) -> Result<()> {
    let ctx = crate::ops::launch_context(rt, Some(batch))?;
    let plan = validate_prefill_in(Some(ctx), batch.cu_seqlens(), inp, out, opts)?;

    // Kernel choices and units, before anything is queued.
    let pre = plan.views(inp, out, validate::PLACEHOLDER);
    let att = sparse::prefill_choice(rt, batch.cu_seqlens(), &plan.sparse, &pre.q_s, &pre.k_s, &pre.v_s, true, &opts.sparse)?;
    let (gdn_spec, gdn_bytes) = gdn::prefill_unit(rt, batch.cu_seqlens(), &pre.gdn_inputs(inp), &pre.gdn_outputs(out), &opts.gdn)?;
    let router_spec = catalog::router_spec(plan.dtype, plan.router.sparsity, rt.arch());
    let merge_spec = catalog::merge_spec(plan.dtype, plan.dvs as u32, rt.arch());
    for spec in [&router_spec, &gdn_spec, &att.spec, &merge_spec] {
        rt.module(spec)?;
    }

    // Workspace and streams.
    let lay = plan.layout(router::partials_len(rt.sm_count(), plan.num_slots, plan.d_model, plan.heads, &opts.router), gdn_bytes);
    let capturing = rt.stream().capture_status()? != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    let two = opts.streams == Streams::Two;
    if two {
        ws.side(rt, capturing)?;
    }
    let base = ws.base(rt, lay.total, capturing)?;
    workspace::check_disjoint(ctx, &plan, inp, out, opts, base, lay.total)?;
    let side = if two { Some(ws.side(rt, capturing)?) } else { None };
    let side_rt = side.map(|s| rt.on_stream(s.stream.clone())).transpose()?;
    let att_rt = side_rt.as_ref().unwrap_or(rt);
    if att.entry == "prefill_ws" {
        // The persistent kernel's tile counter of the stream it runs on (a bounded table).
        att_rt.tile_counter()?;
    }
    let views = plan.views(inp, out, base);

    // Router: labels and lists into the caller's outputs or the workspace.
    let targets = RouterTargets {
        labels: views.labels.ptr(),
        attn_list: views.attn_list.ptr(),
        attn_count: views.attn_count.ptr(),
        logits: 0,
        partial_logits: base + lay.partials as u64,
        margins: base + lay.margins as u64,
    };
    // SAFETY: the targets are the validated router outputs of the caller or regions of
    // the checked workspace laid out for this batch and head count (`Layout`); none
    // overlaps another or any input (checked above).
    unsafe { router::launch(rt, batch, &inp.x, &inp.w_score, &opts.router, &plan.router, &targets)? };

    // Both branches read the router's outputs: fork the second stream after it.
    if let Some(s) = side {
        s.fork.record(rt.stream())?;
        s.stream.wait(&s.fork)?;
    }
    // The GDN branch first (on the runtime's stream): with few sequences its scan has
    // few CTAs on a long sequential path, and the softmax branch's tiles fill the other
    // SMs (its persistent kernel takes tiles from a counter, so CTAs that start late
    // find the work taken). Its scratch is the end of the workspace.
    // SAFETY: [gdn, gdn + gdn_bytes) lies inside the workspace (`Layout`), 256-byte aligned.
    let mut gws = GdnWorkspace::from_scratch(unsafe { Scratch::from_raw(base + lay.gdn as u64, lay.gdn_bytes) });
    let r_gdn = gdn::gdn_prefill(rt, batch, &views.gdn_inputs(inp), &mut views.gdn_outputs(out), &opts.gdn, &mut gws);
    let r_att = if r_gdn.is_ok() {
        let mask = BlockMask::Routed { attn_list: views.attn_list.clone(), attn_count: views.attn_count.clone() };
        sparse::prefill(att_rt, batch, &views.q_s, &views.k_s, &views.v_s, &mask, &opts.sparse, &mut alias_mut(&views.o_att), None)
    } else {
        Ok(())
    };
    // Join even after an error: a capture must not end with a forked stream open.
    if let Some(s) = side {
        s.join.record(&s.stream)?;
        rt.stream().wait(&s.join)?;
    }
    r_gdn?;
    r_att?;
    let m = MergeInputs { o_gdn: views.o_gdn_heads.clone(), o_att: views.o_att.clone(), w: inp.w.clone(), gamma_gdn: inp.gamma_gdn.clone(), gamma_att: inp.gamma_att.clone(), z: inp.z.clone() };
    merge::merge(rt, &m, &mut out.out)
}
