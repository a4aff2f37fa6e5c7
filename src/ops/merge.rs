//! The merge epilogue (SPEC.md section 6): per (token, softmax head) row, RMSNorm of
//! each branch's slice times its gamma, weighted by the 2-way softmax of `w` (weight 0
//! = the GDN branch), times the gate `z * sigmoid(z)`. One launch on the runtime's
//! stream (cuda/merge/).

use crate::error::{Error, Result};
use crate::params::{NatslMergeParams, NATSL_MERGE_MAX_HEADS};
use crate::runtime::Runtime;
use crate::tensor::{ContextId, DType, Operands, TensorMut, TensorRef};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use natsl_codegen::catalog;

// SAFETY: plain C data (pointers, integers, a float), laid out by bindgen as the kernel reads it.
unsafe impl DeviceRepr for NatslMergeParams {}

/// RMSNorm epsilon of both branches (SPEC.md section 6).
pub const MERGE_EPS: f32 = 1e-6;
/// Largest number of softmax heads (the grid's y extent).
pub const MAX_HEADS: usize = NATSL_MERGE_MAX_HEADS as usize;

/// The inputs of one merge. Row tensors are `[T, Ha, dvs]` views of the activation
/// dtype (bf16 or f16) with the last dim contiguous and 16-byte aligned rows; any
/// token and head strides (o_gdn may be a slice of the GDN output).
#[derive(Clone, Debug)]
pub struct MergeInputs<'a> {
    /// `[T, Ha, dvs]`: the GDN branch, viewed as Ha slices of dvs.
    pub o_gdn: TensorRef<'a>,
    /// `[T, Ha, dvs]`: the softmax branch.
    pub o_att: TensorRef<'a>,
    /// `[T, Ha, 2]` weight logits, f32 or the activation dtype (whatever the caller's
    /// GEMM writes); the last dim contiguous, any token and head strides.
    pub w: TensorRef<'a>,
    /// `[dvs]`, the activation dtype, contiguous.
    pub gamma_gdn: TensorRef<'a>,
    /// `[dvs]`, the activation dtype, contiguous.
    pub gamma_att: TensorRef<'a>,
    /// `[T, Ha, dvs]`: the gate.
    pub z: TensorRef<'a>,
}

/// What validation derives from the arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergePlan {
    pub dtype: natsl_codegen::DType,
    pub num_tokens: usize,
    pub num_heads: usize,
    pub dvs: usize,
    pub w_f32: bool,
}

/// Check every argument of a merge; needs no device. `out` `[T, Ha, dvs]` (activation
/// dtype, same layout rules as the row inputs) may not overlap any input.
pub fn validate(inp: &MergeInputs, out: &TensorRef) -> Result<MergePlan> {
    validate_in(None, inp, out)
}

fn check_rows(arg: &'static str, v: &TensorRef, dtype: DType, shape: &[Option<usize>; 3]) -> Result<()> {
    v.check_dtype(arg, &[dtype])?;
    v.check_shape(arg, shape)?;
    v.check_layout(arg, 16)
}

fn check_gamma(arg: &'static str, v: &TensorRef, dtype: DType, dvs: usize) -> Result<()> {
    v.check_dtype(arg, &[dtype])?;
    v.check_shape(arg, &[Some(dvs)])?;
    v.check_contiguous(arg)?;
    v.check_layout(arg, 16)
}

/// [`validate`], also checking that every view is memory of context `ctx`.
#[doc(hidden)]
pub fn validate_in(ctx: Option<ContextId>, inp: &MergeInputs, out: &TensorRef) -> Result<MergePlan> {
    let g = &inp.o_gdn;
    g.check_dtype("o_gdn", &[DType::Bf16, DType::F16])?;
    g.check_shape("o_gdn", &[None, None, None])?;
    g.check_layout("o_gdn", 16)?;
    let dtype = g.dtype();
    let (t, ha, dvs) = (g.dim(0), g.dim(1), g.dim(2));
    if !catalog::MERGE_DIMS.iter().any(|&d| d as usize == dvs) {
        return Err(Error::invalid("o_gdn", format!("merge head dim dvs = {dvs} is not supported (dvs: {:?})", catalog::MERGE_DIMS)));
    }
    if t > i32::MAX as usize {
        return Err(Error::invalid("o_gdn", format!("{t} tokens: at most {}", i32::MAX)));
    }
    if ha > MAX_HEADS {
        return Err(Error::invalid("o_gdn", format!("{ha} heads: at most {MAX_HEADS}")));
    }
    let rows = [Some(t), Some(ha), Some(dvs)];
    check_rows("o_att", &inp.o_att, dtype, &rows)?;
    check_rows("z", &inp.z, dtype, &rows)?;
    let w = &inp.w;
    w.check_dtype("w", &[DType::F32, dtype])?;
    w.check_shape("w", &[Some(t), Some(ha), Some(2)])?;
    w.check_layout("w", w.dtype().size())?;
    check_gamma("gamma_gdn", &inp.gamma_gdn, dtype, dvs)?;
    check_gamma("gamma_att", &inp.gamma_att, dtype, dvs)?;
    check_rows("out", out, dtype, &rows)?;
    Operands::new()
        .read("o_gdn", g)
        .read("o_att", &inp.o_att)
        .read("w", w)
        .read("gamma_gdn", &inp.gamma_gdn)
        .read("gamma_att", &inp.gamma_att)
        .read("z", &inp.z)
        .write("out", out)
        .check(ctx)?;
    let dtype = dtype.activation().ok_or_else(|| Error::invalid("o_gdn", "not an activation dtype"))?;
    Ok(MergePlan { dtype, num_tokens: t, num_heads: ha, dvs, w_f32: w.dtype() == DType::F32 })
}

/// Merge the two branch outputs into `out` on the runtime's stream.
pub fn merge(rt: &Runtime, inp: &MergeInputs, out: &mut TensorMut) -> Result<()> {
    let ctx = super::launch_context(rt, None)?;
    let plan = validate_in(Some(ctx), inp, out.view())?;
    let spec = catalog::merge_spec(plan.dtype, plan.dvs as u32, rt.arch());
    let rows_per_cta = spec.tile.block_m as usize;
    let f = rt.function(&spec, "merge", 0)?;
    let st = |v: &TensorRef, i: usize| v.stride(i) as i64;
    let p = NatslMergeParams {
        o_gdn: inp.o_gdn.ptr() as *const _,
        o_gdn_stride_t: st(&inp.o_gdn, 0),
        o_gdn_stride_h: st(&inp.o_gdn, 1),
        o_att: inp.o_att.ptr() as *const _,
        o_att_stride_t: st(&inp.o_att, 0),
        o_att_stride_h: st(&inp.o_att, 1),
        z: inp.z.ptr() as *const _,
        z_stride_t: st(&inp.z, 0),
        z_stride_h: st(&inp.z, 1),
        out: out.ptr() as *mut _,
        out_stride_t: st(out, 0),
        out_stride_h: st(out, 1),
        w: inp.w.ptr() as *const _,
        w_stride_t: st(&inp.w, 0),
        w_stride_h: st(&inp.w, 1),
        gamma_gdn: inp.gamma_gdn.ptr() as *const _,
        gamma_att: inp.gamma_att.ptr() as *const _,
        num_tokens: plan.num_tokens as i32,
        num_heads: plan.num_heads as i32,
        w_f32: plan.w_f32 as i32,
        eps: MERGE_EPS,
    };
    // T <= i32::MAX and at least 8 rows per CTA: the grid fits its limits.
    let cfg = LaunchConfig { grid_dim: (plan.num_tokens.div_ceil(rows_per_cta) as u32, plan.num_heads as u32, 1), block_dim: (spec.tile.threads(), 1, 1), shared_mem_bytes: 0 };
    // SAFETY: every pointer in `p` was validated above (dtype, shape, strides inside
    // the allocation, 16-byte alignment, no output aliasing, the runtime's context).
    unsafe { rt.stream().launch_builder(&f).arg(&p).launch(cfg)? };
    Ok(())
}
