//! Safe entry points, one module per kernel family: validate -> spec -> launch.
//!
//! The rules every family shares live here and in [`crate::tensor`]: the scale,
//! the head dims, and the runtime's context.

pub mod gdn;
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
    if let Some(b) = batch {
        if b.context() != ctx {
            return Err(Error::invalid("batch", format!("was uploaded to {}, not to the runtime's {ctx}", b.context())));
        }
    }
    Ok(ctx)
}

/// A scratch or output allocation of `arg` must belong to the runtime's context too.
pub(crate) fn check_alloc<T>(arg: &'static str, s: &cudarc::driver::CudaSlice<T>, ctx: ContextId) -> Result<()> {
    let c = ContextId::of(s.context());
    if c != ctx {
        return Err(Error::invalid(arg, format!("was allocated in {c}, not in the runtime's {ctx}")));
    }
    Ok(())
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
