//! The layer's workspace: device memory for the branch outputs and the router's
//! labels, lists and partials (and the GDN op's own scratch), plus the second stream
//! and the fork / join events of the overlapped branches.

use super::validate::{add_outputs, validate_prefill_in, PLACEHOLDER};
use super::{PrefillInputs, PrefillOptions, PrefillOutputs};
use crate::error::{Error, Result};
use crate::ops::{gdn, router};
use crate::runtime::Runtime;
use crate::tensor::{ContextId, DType, Operands, TensorRef};
use crate::workspace::Scratch;
use cudarc::driver::{CudaEvent, CudaStream};
use std::sync::Arc;

/// The second stream and its events, created once per context (outside any capture).
pub(crate) struct SideStream {
    ctx: ContextId,
    pub stream: Arc<CudaStream>,
    pub fork: CudaEvent,
    pub join: CudaEvent,
}

/// Scratch of [`super::prefill`], reusable across calls: natsl's own memory (grown on
/// demand; [`PrefillWorkspace::reserve`] before a CUDA graph capture) or the caller's
/// ([`PrefillWorkspace::from_scratch`], at least [`prefill_workspace_bytes`], never
/// grown). Also holds the second stream of [`super::Streams::Two`].
///
/// Used by one call at a time: calls on different streams that share a workspace must
/// be ordered by the caller.
#[derive(Default)]
pub struct PrefillWorkspace {
    pub scratch: Scratch,
    side: Option<SideStream>,
}

impl std::fmt::Debug for PrefillWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefillWorkspace").field("scratch", &self.scratch).field("second_stream", &self.side.is_some()).finish()
    }
}

impl PrefillWorkspace {
    /// Empty: natsl allocates on first use.
    pub fn new() -> Self {
        Self::default()
    }
    /// A workspace over the caller's memory (never grown by natsl).
    pub fn from_scratch(scratch: Scratch) -> Self {
        PrefillWorkspace { scratch, side: None }
    }
    /// Create the second stream and its events for `rt`'s context now: a call inside a
    /// CUDA graph capture creates none (it fails naming `workspace` instead).
    pub fn prepare(&mut self, rt: &Runtime) -> Result<()> {
        self.side(rt, false).map(|_| ())
    }
    /// [`PrefillWorkspace::prepare`], and allocate `bytes` now (natsl's own memory; e.g.
    /// [`prefill_workspace_bytes`] of the largest call) so that later calls allocate nothing.
    pub fn reserve(&mut self, rt: &Runtime, bytes: usize) -> Result<()> {
        self.prepare(rt)?;
        self.scratch.reserve(rt, bytes)
    }

    /// The second stream of `rt`'s context, created on first use outside a capture.
    pub(crate) fn side(&mut self, rt: &Runtime, capturing: bool) -> Result<&SideStream> {
        let ctx = rt.context_id();
        if self.side.as_ref().is_none_or(|s| s.ctx != ctx) {
            if capturing {
                return Err(Error::invalid("workspace", "its second stream does not exist yet and a CUDA graph capture is under way: call PrefillWorkspace::prepare (or reserve, or run the call once) before capturing"));
            }
            let c = rt.context();
            let stream = c.new_stream()?;
            // Timing off: these events only order the two streams.
            let (fork, join) = (c.new_event(None)?, c.new_event(None)?);
            self.side = Some(SideStream { ctx, stream, fork, join });
        }
        self.side.as_ref().ok_or_else(|| Error::invalid("workspace", "no second stream"))
    }

    /// The device address of at least `bytes` of scratch, allocating (natsl's own
    /// memory, outside a capture) where it holds less.
    pub(crate) fn base(&mut self, rt: &Runtime, bytes: usize, capturing: bool) -> Result<u64> {
        if capturing && self.scratch.grows() && self.scratch.bytes() < bytes {
            return Err(Error::invalid("workspace", format!("holds {} bytes, this call needs {bytes}, and a CUDA graph capture is under way: reserve it before capturing", self.scratch.bytes())));
        }
        self.scratch.ptr(rt, bytes)
    }
}

/// The caller's workspace may not overlap any tensor of the call.
pub(crate) fn check_disjoint(ctx: ContextId, plan: &super::LayerPlan, inp: &PrefillInputs, out: &PrefillOutputs, opts: &PrefillOptions, base: u64, bytes: usize) -> Result<()> {
    let mut ops = Operands::new();
    for (arg, t) in [("q", &inp.q), ("k", &inp.k), ("v", &inp.v), ("g", &inp.g), ("beta", &inp.beta), ("x", &inp.x), ("w_score", &inp.w_score), ("w", &inp.w), ("gamma_gdn", &inp.gamma_gdn), ("gamma_att", &inp.gamma_att), ("z", &inp.z)] {
        ops.read(arg, t);
    }
    for (arg, t) in [("q_norm_w", &opts.sparse.q_norm_w), ("k_norm_w", &opts.sparse.k_norm_w)] {
        if let Some(t) = t {
            ops.read(arg, t);
        }
    }
    add_outputs(&mut ops, out, plan.seqs);
    // SAFETY: only compared with the views above, never launched on.
    let ws = unsafe { TensorRef::from_raw(base, bytes.max(1), DType::U8, &[bytes.max(1)], &[1]) };
    ops.write("workspace", &ws);
    ops.check(Some(ctx))
}

/// Workspace bytes a [`super::prefill`] call with these arguments needs on `rt`
/// (validates the call; needs no device memory). A caller's workspace of this size
/// serves every call of the same shapes and options on this device.
pub fn prefill_workspace_bytes(rt: &Runtime, cu_seqlens: &[i32], inp: &PrefillInputs, out: &PrefillOutputs, opts: &PrefillOptions) -> Result<usize> {
    let plan = validate_prefill_in(Some(rt.context_id()), cu_seqlens, inp, out, opts)?;
    let v = plan.views(inp, out, PLACEHOLDER);
    let gdn_bytes = gdn::prefill_workspace_bytes(rt, cu_seqlens, &v.gdn_inputs(inp), &v.gdn_outputs(out), &opts.gdn)?;
    Ok(plan.layout(router::partials_len(rt.sm_count(), plan.num_slots, plan.d_model, plan.heads, &opts.router), gdn_bytes).total)
}

/// [`prefill_workspace_bytes`] for a device of `sm_count` SMs on code path `arch`,
/// without a runtime (for sizing on the host; at least what the device needs).
pub fn prefill_workspace_bytes_for(arch: natsl_codegen::Arch, sm_count: u32, cu_seqlens: &[i32], inp: &PrefillInputs, out: &PrefillOutputs, opts: &PrefillOptions) -> Result<usize> {
    let plan = validate_prefill_in(None, cu_seqlens, inp, out, opts)?;
    let v = plan.views(inp, out, PLACEHOLDER);
    let gdn_bytes = gdn::prefill_workspace_bytes_for(arch, sm_count, cu_seqlens, &v.gdn_inputs(inp), &v.gdn_outputs(out), &opts.gdn)?;
    Ok(plan.layout(router::partials_len(sm_count, plan.num_slots, plan.d_model, plan.heads, &opts.router), gdn_bytes).total)
}
