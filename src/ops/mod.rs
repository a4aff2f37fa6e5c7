//! Safe entry points, one module per kernel family: validate -> spec -> launch.

pub mod gdn;
pub mod router;
pub mod sparse;

use crate::params::*;
use cudarc::driver::DeviceRepr;

// SAFETY: the params structs are plain C data (integers, floats, device
// pointers), laid out by bindgen exactly as the kernels read them.
unsafe impl DeviceRepr for NatslRouterParams {}

/// The kernels a model calls, for [`crate::Runtime::warmup`]: the units that the
/// default paths of its calls pick (e.g. `ModelKernels::natsl_340m()`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelKernels {
    /// Activation dtype.
    pub dtype: natsl_codegen::DType,
    /// GDN head dims (dk, dv) if the model has the GDN branch (prefill and decode).
    pub gdn: Option<(u32, u32)>,
    /// Sparse-softmax head dims (dk, dv) (prefill and decode).
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
        }
        v.sort();
        v.dedup();
        v
    }
}
