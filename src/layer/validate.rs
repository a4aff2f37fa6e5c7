//! Validation of a layer prefill: each op's own validation on the views the layer
//! hands it, then the rules that tie the ops together.

use super::{alias_mut, alias_pool, PrefillInputs, PrefillOptions, PrefillOutputs};
use crate::batch::SeqLayout;
use crate::error::{Error, Result};
use crate::ops::gdn::{self, GdnDims, GdnPrefillInputs, GdnPrefillOutputs};
use crate::ops::merge::{self, MergeInputs, MergePlan};
use crate::ops::router::{self, RouterPlan};
use crate::ops::sparse::{self, BlockMask};
use crate::tensor::{Access, ContextId, DType, Operands, TensorMut, TensorRef};
use crate::workspace::align;

/// Where validation and sizing place the workspace regions before the real workspace
/// is known: above every device address (< 2^57) and every fake test address, so the
/// per-op overlap checks see no false overlap; never launched on.
pub(crate) const PLACEHOLDER: u64 = 0xF000_0000_0000_0000;

/// What validation derives from the arguments of a layer prefill.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerPlan {
    pub tokens: usize,
    pub seqs: usize,
    /// Chunk slots (`T / 64 + N`): the first dim of the labels.
    pub num_slots: usize,
    pub d_model: usize,
    /// GDN heads = routing heads (H).
    pub heads: usize,
    pub dk: usize,
    pub dv: usize,
    /// Softmax heads (Ha), each `dks` / `dvs` wide.
    pub softmax_heads: usize,
    pub dks: usize,
    pub dvs: usize,
    pub dtype: natsl_codegen::DType,
    /// Which router outputs the caller gave (labels, attn_list, attn_count).
    pub caller_router: [bool; 3],
    pub router: RouterPlan,
    pub gdn: GdnDims,
    pub sparse: sparse::PrefillPlan,
    pub merge: MergePlan,
}

/// Byte offsets of the workspace regions after the head regions ([`Head`], which the
/// views address): the router's margins and partials, then the GDN op's own scratch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub margins: usize,
    pub partials: usize,
    pub gdn: usize,
    pub gdn_bytes: usize,
    pub total: usize,
}

/// The views one launch (or validation, at [`PLACEHOLDER`]) hands the ops.
pub(crate) struct Views<'a> {
    /// `[T, H, dv]`: the GDN branch output.
    pub o_gdn: TensorRef<'static>,
    /// The same memory as `[T, Ha, dvs]` slices (the merge's o_gdn).
    pub o_gdn_heads: TensorRef<'static>,
    /// `[T, Ha, dvs]`: the softmax branch output.
    pub o_att: TensorRef<'static>,
    pub labels: TensorRef<'a>,
    pub attn_list: TensorRef<'a>,
    pub attn_count: TensorRef<'a>,
    /// The softmax heads as views of q, k, v.
    pub q_s: TensorRef<'a>,
    pub k_s: TensorRef<'a>,
    pub v_s: TensorRef<'a>,
}

impl<'a> Views<'a> {
    pub fn gdn_inputs(&self, inp: &PrefillInputs<'a>) -> GdnPrefillInputs<'a> {
        GdnPrefillInputs { q: inp.q.clone(), k: inp.k.clone(), v: inp.v.clone(), g: inp.g.clone(), beta: inp.beta.clone(), labels: Some(self.labels.clone()), h0: None }
    }
    pub fn gdn_outputs(&self, out: &PrefillOutputs<'a>) -> GdnPrefillOutputs<'a> {
        GdnPrefillOutputs { o: alias_mut(&self.o_gdn), committed: alias_pool(&out.committed), running: alias_pool(&out.running), gsum_running: out.gsum_running.as_ref().map(|t| alias_mut(t.view())) }
    }
}

/// A view of workspace memory at `addr`.
fn region(addr: u64, dtype: DType, shape: &[usize], strides: &[usize]) -> TensorRef<'static> {
    // Saturating: validation builds these before it knows every extent is nonzero.
    let avail = shape.iter().zip(strides).map(|(s, st)| s.saturating_sub(1).saturating_mul(*st)).fold(1usize, usize::saturating_add);
    // SAFETY: a region of the layer's workspace (or, at PLACEHOLDER, never launched on).
    unsafe { TensorRef::from_raw(addr, avail, dtype, shape, strides) }
}

/// The `[T, Ha, d_s]` softmax heads of a `[T, H, d]` view (`arg` names it): the same
/// view when Ha = H, else the d_s-wide slices of each token's packed heads.
fn softmax_view<'a>(arg: &'static str, t: &TensorRef<'a>, ha: usize, d_s: usize) -> Result<TensorRef<'a>> {
    let (tok, h, d) = (t.dim(0), t.dim(1), t.dim(2));
    if ha == h {
        return Ok(t.clone());
    }
    if h > 1 && t.stride(1) != d {
        return Err(Error::invalid(arg, format!("head stride {} with {ha} softmax heads over {h} heads of {d}: the softmax heads are {d_s}-wide slices of each token's row, so the heads must be packed (head stride {d})", t.stride(1))));
    }
    // SAFETY: the same memory as `t` (validated): Ha * d_s = H * d elements per token.
    let mut v = unsafe { TensorRef::from_raw(t.ptr(), t.avail(), t.dtype(), &[tok, ha, d_s], &[t.stride(0), d_s, 1]) };
    v.set_context(t.context());
    Ok(v)
}

fn check_router_out(arg: &'static str, t: &Option<TensorMut>, dtype: DType, shape: [usize; 2]) -> Result<()> {
    if let Some(t) = t {
        t.check_dtype(arg, &[dtype])?;
        t.check_shape(arg, &[Some(shape[0]), Some(shape[1])])?;
        t.check_contiguous(arg)?;
        t.check_layout(arg, dtype.size())?;
    }
    Ok(())
}

/// The op's `scale` under the name of the layer option it came from.
fn rename_scale(e: Error, to: &'static str) -> Error {
    match e {
        Error::InvalidArgument { arg: "scale", reason } => Error::invalid(to, reason),
        e => e,
    }
}

/// Check every argument of a layer prefill; needs no device. Aliasing: no output
/// may overlap another output or any input (inputs may overlap one another).
pub fn validate_prefill(cu_seqlens: &[i32], inp: &PrefillInputs, out: &PrefillOutputs, opts: &PrefillOptions) -> Result<LayerPlan> {
    validate_prefill_in(None, cu_seqlens, inp, out, opts)
}

/// [`validate_prefill`], also checking that every view is memory of context `ctx`.
#[doc(hidden)]
pub fn validate_prefill_in(ctx: Option<ContextId>, cu_seqlens: &[i32], inp: &PrefillInputs, out: &PrefillOutputs, opts: &PrefillOptions) -> Result<LayerPlan> {
    let layout = SeqLayout::new(cu_seqlens)?;
    let (t, n, ns) = (layout.total_tokens(), layout.num_seqs(), layout.num_slots());

    // The router first: its outputs feed both branches.
    let rplan = router::validate_in(ctx, &layout, &inp.x, &inp.w_score, &opts.router)?;
    let h = rplan.num_heads;

    // The GDN branch, on workspace views where the caller gave no router output.
    let caller_router = [out.labels.is_some(), out.attn_list.is_some(), out.attn_count.is_some()];
    let (dk, dv) = (inp.q.dim(2), inp.v.dim(2));
    let act = inp.q.dtype();
    // The softmax head count is known only after z; the regions before o_att need none.
    let ws_at = |ha: usize, dvs: usize| Layout::head(t, n, ns, h, dv, ha, dvs, act, caller_router).at(PLACEHOLDER);
    let lay0 = ws_at(1, dv);
    let labels = out.labels.as_ref().map_or_else(|| region(lay0.labels, DType::U8, &[ns, h], &[h, 1]), |l| l.view().clone());
    let gdn_in = GdnPrefillInputs { q: inp.q.clone(), k: inp.k.clone(), v: inp.v.clone(), g: inp.g.clone(), beta: inp.beta.clone(), labels: Some(labels), h0: None };
    let hv = inp.v.dim(1);
    let o_gdn = region(lay0.o_gdn, act, &[t, hv, dv], &[hv.saturating_mul(dv), dv, 1]);
    let gdn_out = GdnPrefillOutputs { o: alias_mut(&o_gdn), committed: alias_pool(&out.committed), running: alias_pool(&out.running), gsum_running: out.gsum_running.as_ref().map(|g| alias_mut(g.view())) };
    let gplan = gdn::validate_prefill_in(ctx, cu_seqlens, &gdn_in, &gdn_out, &opts.gdn).map_err(|e| rename_scale(e, "gdn.scale"))?;
    if gplan.hv != gplan.hqk {
        return Err(Error::invalid("v", format!("{} value heads over {} q/k heads: the layer has one value head per q/k head (no GVA)", gplan.hv, gplan.hqk)));
    }
    if gplan.hv != h {
        return Err(Error::invalid("w_score", format!("{} rows score {h} routing heads, but q has {} heads (one routing head per GDN head)", 2 * h, gplan.hv)));
    }
    // The router's outputs (the GDN op has checked the labels it reads).
    check_router_out("labels", &out.labels, DType::U8, [ns, h])?;
    check_router_out("attn_list", &out.attn_list, DType::I32, [h, ns])?;
    check_router_out("attn_count", &out.attn_count, DType::I32, [n, h])?;

    // The softmax heads: z's shape, tiling the GDN heads.
    inp.z.check_shape("z", &[Some(t), None, None])?;
    let (ha, dvs) = (inp.z.dim(1), inp.z.dim(2));
    // Bounded first (the merge's limits), so that the tiling arithmetic cannot overflow.
    if ha == 0 || ha > merge::MAX_HEADS {
        return Err(Error::invalid("z", format!("{ha} softmax heads: must be 1..={}", merge::MAX_HEADS)));
    }
    if !natsl_codegen::catalog::MERGE_DIMS.iter().any(|&d| d as usize == dvs) {
        return Err(Error::invalid("z", format!("softmax head dim dvs = {dvs} is not supported (dvs: {:?})", natsl_codegen::catalog::MERGE_DIMS)));
    }
    if !ha.is_multiple_of(h) || h * dv != ha * dvs || !(h * dk).is_multiple_of(ha) {
        return Err(Error::invalid("z", format!("{ha} softmax heads of {dvs} do not tile the {h} GDN heads of dk {dk} / dv {dv} (Ha a multiple of H, Ha dvs = H dv, H dk divisible by Ha)")));
    }
    let dks = h * dk / ha;
    let (q_s, k_s, v_s) = (softmax_view("q", &inp.q, ha, dks)?, softmax_view("k", &inp.k, ha, dks)?, softmax_view("v", &inp.v, ha, dvs)?);
    let lay = ws_at(ha, dvs);
    let list = out.attn_list.as_ref().map_or_else(|| region(lay.attn_list, DType::I32, &[h, ns], &[ns, 1]), |l| l.view().clone());
    let count = out.attn_count.as_ref().map_or_else(|| region(lay.attn_count, DType::I32, &[n, h], &[h, 1]), |l| l.view().clone());
    let o_att = region(lay.o_att, act, &[t, ha, dvs], &[ha * dvs, dvs, 1]);
    let mask = BlockMask::Routed { attn_list: list, attn_count: count };
    let splan = sparse::validate_prefill_in(ctx, cu_seqlens, &q_s, &k_s, &v_s, &mask, &opts.sparse, &o_att, None).map_err(|e| rename_scale(e, "sparse.scale"))?;

    // The merge over the GDN output's [T, Ha, dvs] slices.
    let o_gdn_heads = region(lay.o_gdn, act, &[t, ha, dvs], &[h * dv, dvs, 1]);
    let m = MergeInputs { o_gdn: o_gdn_heads, o_att, w: inp.w.clone(), gamma_gdn: inp.gamma_gdn.clone(), gamma_att: inp.gamma_att.clone(), z: inp.z.clone() };
    let mplan = merge::validate_in(ctx, &m, out.out.view())?;

    // Across the ops: no output overlaps another output or any input.
    let mut ops = Operands::new();
    ops.read("q", &inp.q).read("k", &inp.k).read("v", &inp.v).read("g", &inp.g).read("beta", &inp.beta);
    ops.read("x", &inp.x).read("w_score", &inp.w_score).read("w", &inp.w).read("gamma_gdn", &inp.gamma_gdn).read("gamma_att", &inp.gamma_att).read("z", &inp.z);
    if let Some(wq) = &opts.sparse.q_norm_w {
        ops.read("q_norm_w", wq);
    }
    if let Some(wk) = &opts.sparse.k_norm_w {
        ops.read("k_norm_w", wk);
    }
    add_outputs(&mut ops, out, n);
    ops.check(ctx)?;

    Ok(LayerPlan {
        tokens: t,
        seqs: n,
        num_slots: ns,
        d_model: rplan.d_model,
        heads: h,
        dk,
        dv,
        softmax_heads: ha,
        dks,
        dvs,
        dtype: gplan.dtype,
        caller_router,
        router: rplan,
        gdn: gplan,
        sparse: splan,
        merge: mplan,
    })
}

/// Every output of the call, as written views of `ops`.
pub(crate) fn add_outputs(ops: &mut Operands, out: &PrefillOutputs, n: usize) {
    ops.write("out", out.out.view());
    for (arg, t) in [("labels", &out.labels), ("attn_list", &out.attn_list), ("attn_count", &out.attn_count), ("gsum_running", &out.gsum_running)] {
        if let Some(t) = t {
            ops.write(arg, t.view());
        }
    }
    if let Some(c) = &out.committed {
        gdn::pool_operand(ops, "committed", "committed_index", Access::Write, c.pool.view(), &c.index, n);
    }
    if let Some(r) = &out.running {
        gdn::pool_operand(ops, "running", "running_index", Access::Write, r.pool.view(), &r.index, n);
    }
}

/// The region offsets before the router's partials and the GDN scratch (what the views
/// need), a function of the shapes only: labels, attn_list, attn_count, margins,
/// o_gdn, o_att.
struct Head {
    o_gdn: usize,
    o_att: usize,
    labels: Option<usize>,
    attn_list: Option<usize>,
    attn_count: Option<usize>,
    margins: usize,
    end: usize,
}

/// Addresses of the head regions at one base (a region the caller gave: unused).
struct HeadAt {
    o_gdn: u64,
    o_att: u64,
    labels: u64,
    attn_list: u64,
    attn_count: u64,
}

impl Head {
    fn at(&self, base: u64) -> HeadAt {
        // Saturating: validation places regions before it has bounded every extent.
        let a = |o: Option<usize>| o.map_or(base, |o| base.saturating_add(o as u64));
        HeadAt { o_gdn: base.saturating_add(self.o_gdn as u64), o_att: base.saturating_add(self.o_att as u64), labels: a(self.labels), attn_list: a(self.attn_list), attn_count: a(self.attn_count) }
    }
}

impl Layout {
    #[allow(clippy::too_many_arguments)]
    fn head(t: usize, n: usize, ns: usize, h: usize, dv: usize, ha: usize, dvs: usize, act: DType, caller: [bool; 3]) -> Head {
        // Saturating: validated shapes stay far below, and sizing must not wrap on any input.
        let mut off = 0usize;
        let mut take = |bytes: usize| {
            let o = off;
            off = off.saturating_add(align(bytes));
            o
        };
        // o_att last: the only region whose size depends on the softmax heads.
        let es = act.size();
        let labels = (!caller[0]).then(|| take(ns.saturating_mul(h)));
        let attn_list = (!caller[1]).then(|| take(ns.saturating_mul(h).saturating_mul(4)));
        let attn_count = (!caller[2]).then(|| take(n.saturating_mul(h).saturating_mul(4)));
        let margins = take(ns.saturating_mul(h).saturating_mul(4));
        let o_gdn = take(t.saturating_mul(h).saturating_mul(dv).saturating_mul(es));
        let o_att = take(t.saturating_mul(ha).saturating_mul(dvs).saturating_mul(es));
        Head { o_gdn, o_att, labels, attn_list, attn_count, margins, end: off }
    }
}

impl LayerPlan {
    fn head(&self) -> Head {
        let act = match self.dtype {
            natsl_codegen::DType::F16 => DType::F16,
            _ => DType::Bf16,
        };
        Layout::head(self.tokens, self.seqs, self.num_slots, self.heads, self.dv, self.softmax_heads, self.dvs, act, self.caller_router)
    }

    /// The whole workspace: the head regions, `partials` f32 of the router, then
    /// `gdn_bytes` of the GDN op's own scratch.
    pub(crate) fn layout(&self, partials: usize, gdn_bytes: usize) -> Layout {
        let hd = self.head();
        let p = hd.end;
        let gdn = p.saturating_add(align(partials.saturating_mul(4)));
        Layout { margins: hd.margins, partials: p, gdn, gdn_bytes, total: gdn.saturating_add(align(gdn_bytes)) }
    }

    /// The views of a launch with the workspace at `base` (validated shapes).
    pub(crate) fn views<'a>(&self, inp: &PrefillInputs<'a>, out: &PrefillOutputs<'a>, base: u64) -> Views<'a> {
        let (t, n, ns, h, ha) = (self.tokens, self.seqs, self.num_slots, self.heads, self.softmax_heads);
        let (dv, dvs, dks) = (self.dv, self.dvs, self.dks);
        let at = self.head().at(base);
        let act = inp.q.dtype();
        let pick = |o: &Option<TensorMut<'a>>, addr: u64, dt: DType, shape: [usize; 2]| -> TensorRef<'a> { o.as_ref().map_or_else(|| region(addr, dt, &shape, &[shape[1], 1]), |l| l.view().clone()) };
        let sv = |arg, v: &TensorRef<'a>, d| softmax_view(arg, v, ha, d).unwrap_or_else(|_| v.clone());
        Views {
            o_gdn: region(at.o_gdn, act, &[t, h, dv], &[h * dv, dv, 1]),
            o_gdn_heads: region(at.o_gdn, act, &[t, ha, dvs], &[h * dv, dvs, 1]),
            o_att: region(at.o_att, act, &[t, ha, dvs], &[ha * dvs, dvs, 1]),
            labels: pick(&out.labels, at.labels, DType::U8, [ns, h]),
            attn_list: pick(&out.attn_list, at.attn_list, DType::I32, [h, ns]),
            attn_count: pick(&out.attn_count, at.attn_count, DType::I32, [n, h]),
            q_s: sv("q", &inp.q, dks),
            k_s: sv("k", &inp.k, dks),
            v_s: sv("v", &inp.v, dvs),
        }
    }
}
