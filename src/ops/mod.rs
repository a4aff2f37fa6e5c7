//! Safe entry points, one module per kernel family: validate -> spec -> launch.
//!
//! The rules every family shares live here and in [`crate::tensor`]: the scale,
//! the head dims, and the runtime's context.

pub mod gdn;
pub mod merge;
pub mod router;
pub mod sparse;

use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::params::*;
use crate::runtime::Runtime;
use crate::tensor::ContextId;
use cudarc::driver::DeviceRepr;

// SAFETY: the params structs are plain C data (integers, floats, device
// pointers), laid out by bindgen exactly as the kernels read them.
unsafe impl DeviceRepr for NatslRouterParams {}

/// The scale rule of both attention families: `None` is dk^-1/2; a given scale must
/// be finite and positive, and stay finite once folded into the exponent base
/// (`scale * log2(e)`, as the softmax kernels use it). Positive because the softmax
/// kernels take row maxima of raw scores (the max of scale * s only for scale > 0); a
/// zero or negative GDN scale is a caller's bug (it zeroes or negates the output).
pub(crate) fn check_scale(scale: Option<f32>, dk: usize) -> Result<f32> {
    let s = scale.unwrap_or(1.0 / (dk as f32).sqrt());
    if !(s.is_finite() && s > 0.0 && (s * std::f32::consts::LOG2_E).is_finite()) {
        return Err(Error::invalid("scale", format!("{s}: must be finite and positive, with scale * log2(e) finite")));
    }
    Ok(s)
}

/// The head-dim rule of both families: a dk no shipped pair has names `dk_arg` (the
/// tensor dk is read from), an unsupported dv for that dk names `dv_arg`.
pub(crate) fn check_head_dims(family: &str, dk: usize, dv: usize, pairs: &[(u32, u32)], dk_arg: &'static str, dv_arg: &'static str) -> Result<()> {
    let list: Vec<String> = pairs.iter().map(|(a, b)| format!("{a}/{b}")).collect();
    if !pairs.iter().any(|&(a, _)| a as usize == dk) {
        return Err(Error::invalid(dk_arg, format!("{family} head dim dk = {dk} is not supported (dk/dv pairs: {})", list.join(", "))));
    }
    if !pairs.iter().any(|&(a, b)| a as usize == dk && b as usize == dv) {
        return Err(Error::invalid(dv_arg, format!("{family} head dims dk = {dk}, dv = {dv} are not supported (dk/dv pairs: {})", list.join(", "))));
    }
    Ok(())
}

/// The runtime's context, once `batch` (if any) is known to be memory of it.
pub(crate) fn launch_context(rt: &Runtime, batch: Option<&Batch>) -> Result<ContextId> {
    let ctx = rt.context_id();
    if let Some(c) = batch.and_then(|b| b.context()) {
        if c != ctx {
            return Err(Error::invalid("batch", format!("was uploaded to {c}, not to the runtime's {ctx}")));
        }
    }
    Ok(ctx)
}

/// Size arithmetic of the public size helpers: saturating at `usize::MAX`, so a huge
/// request fails to allocate (or is rejected) instead of wrapping to a small size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Sat(pub usize);

impl std::ops::Add<Sat> for Sat {
    type Output = Sat;
    fn add(self, o: Sat) -> Sat {
        Sat(self.0.saturating_add(o.0))
    }
}
impl std::ops::Add<usize> for Sat {
    type Output = Sat;
    fn add(self, o: usize) -> Sat {
        Sat(self.0.saturating_add(o))
    }
}
impl std::ops::Mul<Sat> for Sat {
    type Output = Sat;
    fn mul(self, o: Sat) -> Sat {
        Sat(self.0.saturating_mul(o.0))
    }
}
impl std::ops::Mul<usize> for Sat {
    type Output = Sat;
    fn mul(self, o: usize) -> Sat {
        Sat(self.0.saturating_mul(o))
    }
}
impl std::ops::Mul<Sat> for usize {
    type Output = Sat;
    fn mul(self, o: Sat) -> Sat {
        Sat(self.saturating_mul(o.0))
    }
}

/// The kernels a model calls, for [`crate::Runtime::warmup`]: the units that the
/// default paths of its calls pick (e.g. `ModelKernels::natsl_340m()`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelKernels {
    /// Activation dtype.
    pub dtype: natsl_codegen::DType,
    /// GDN head dims (dk, dv) if the model has the GDN branch (prefill and decode).
    pub gdn: Option<(u32, u32)>,
    /// Sparse-softmax head dims (dk, dv) (prefill and decode; also the merge over dvs = dv).
    pub sparse: Option<(u32, u32)>,
    /// The router's policy, if it runs on the device.
    pub router: Option<router::RouterPolicy>,
}

impl ModelKernels {
    /// NAtS-L-340M: bf16, GDN 128/256, sparse 64/128, argmax router.
    pub fn natsl_340m() -> Self {
        ModelKernels { dtype: natsl_codegen::DType::Bf16, gdn: Some((128, 256)), sparse: Some((64, 128)), router: Some(router::RouterPolicy::Argmax) }
    }

    /// The specs for code path `arch` (deduplicated).
    pub fn specs(&self, arch: natsl_codegen::Arch) -> Vec<natsl_codegen::KernelSpec> {
        use natsl_codegen::catalog;
        let mut v = Vec::new();
        if let Some(p) = self.router {
            let sp = match p {
                router::RouterPolicy::Argmax => natsl_codegen::Sparsity::Dense,
                _ => natsl_codegen::Sparsity::TopKRuntime,
            };
            v.push(catalog::router_spec(self.dtype, sp, arch));
        }
        if let Some((dk, dv)) = self.gdn {
            v.extend(gdn::prefill_specs(self.dtype, dk, dv, arch));
            v.push(catalog::gdn_decode_spec(self.dtype, dk, dv, arch));
        }
        if let Some((dk, dv)) = self.sparse {
            let dims = natsl_codegen::HeadDims { dk, dv };
            v.push(catalog::sparse_prefill_spec(self.dtype, dims, arch));
            v.push(catalog::sparse_decode_spec(self.dtype, dims, arch));
            // The merge runs over the softmax heads' slices: dvs = the softmax dv.
            if catalog::MERGE_DIMS.contains(&dv) {
                v.push(catalog::merge_spec(self.dtype, dv, arch));
            }
        }
        v.sort();
        v.dedup();
        v
    }
}
