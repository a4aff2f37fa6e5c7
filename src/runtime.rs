//! The runtime: a CUDA context and stream, the device's properties, and the
//! module cache (embedded image, else disk cache, else NVRTC).

use crate::error::{Error, Result};
use crate::jit;
use crate::tensor::ContextId;
use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use natsl_codegen::{Arch, KernelSpec};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

mod aot {
    include!(concat!(env!("OUT_DIR"), "/aot.rs"));
}

/// Is a CUDA driver present on this machine (without touching any device)?
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Images embedded at build time by the `aot` feature: (unit name, arch, cubin).
pub fn embedded_images() -> &'static [(&'static str, &'static str, &'static [u8])] {
    aot::IMAGES
}

/// Owns the context, the stream every natsl launch goes to, and compiled modules.
///
/// Every natsl launch is queued on [`Runtime::stream`]. Buffers that other streams
/// also use must be ordered with it by the caller (events or stream waits): the
/// runtime turns off cudarc's automatic per-buffer event tracking for its context.
pub struct Runtime {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: Arch,
    /// The real target images are built for: `sm_90a` for the Hopper path, the
    /// device's own `sm_XY` for the sm_80 path (cubins run only on their major arch).
    target: String,
    sm_count: u32,
    max_smem_optin: u32,
    modules: Mutex<HashMap<KernelSpec, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(KernelSpec, String), (CudaFunction, u32)>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("arch", &self.arch).field("sm_count", &self.sm_count).finish()
    }
}

impl Runtime {
    /// Open device `ordinal` with its best code path (`sm_90a` on Hopper, else `sm_80`).
    pub fn new(ordinal: usize) -> Result<Runtime> {
        Self::open(ordinal, None)
    }

    /// Open device `ordinal`, forcing a code path (e.g. `Arch::Sm80` on an H200 to test it).
    pub fn with_arch(ordinal: usize, arch: Arch) -> Result<Runtime> {
        Self::open(ordinal, Some(arch))
    }

    fn open(ordinal: usize, force: Option<Arch>) -> Result<Runtime> {
        if !driver_present() {
            return Err(Error::NoDevice("libcuda not found".into()));
        }
        let n = CudaContext::device_count().map_err(|e| Error::NoDevice(format!("{e:?}")))?;
        if ordinal >= n.max(0) as usize {
            return Err(Error::NoDevice(format!("device {ordinal} requested, {n} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoDevice(format!("{e:?}")))?;
        let (major, minor) = ctx.compute_capability()?;
        let best = Arch::for_capability(major, minor).ok_or_else(|| Error::Unsupported(format!("compute capability {major}.{minor} (natsl needs 8.0+)")))?;
        let arch = match force {
            Some(Arch::Sm90a) if best != Arch::Sm90a => return Err(Error::Unsupported(format!("sm_90a path on compute capability {major}.{minor}"))),
            Some(a) => a,
            None => best,
        };
        let sm_count = ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_smem_optin = ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        // A stream of our own (not the legacy default stream): capturable into
        // CUDA graphs, and ordered with the caller's work only through events.
        let stream = ctx.new_stream()?;
        // natsl queues all of its work on this one stream, so cudarc's per-buffer
        // event tracking would only add driver calls to every launch (measured: it
        // dominated the host cost of small launches).
        // SAFETY: callers that use natsl buffers on other streams must order that
        // work themselves (documented on `Runtime`).
        unsafe { ctx.disable_event_tracking() };
        let target = match arch {
            Arch::Sm90a => "sm_90a".to_string(),
            Arch::Sm80 => format!("sm_{major}{minor}"),
        };
        Ok(Runtime { ctx, stream, arch, target, sm_count, max_smem_optin, modules: Mutex::new(HashMap::new()), functions: Mutex::new(HashMap::new()) })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// What every tensor of a launch is compared with ([`crate::TensorRef::context`]).
    pub fn context_id(&self) -> ContextId {
        ContextId::of(&self.ctx)
    }
    /// The stream every natsl launch is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn arch(&self) -> Arch {
        self.arch
    }
    /// The real target kernels are compiled for (`sm_90a`, or e.g. `sm_90` for the sm_80 path on an H200).
    pub fn target(&self) -> &str {
        &self.target
    }
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    /// Largest dynamic shared memory a block can opt in to.
    pub fn max_smem_optin(&self) -> u32 {
        self.max_smem_optin
    }

    /// The module of `spec` (for this runtime's arch), loading or compiling it on first use.
    pub fn module(&self, spec: &KernelSpec) -> Result<Arc<CudaModule>> {
        let mut spec = *spec;
        spec.arch = self.arch;
        let mut cache = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = cache.get(&spec) {
            return Ok(m.clone());
        }
        let unit = natsl_codegen::emit(&spec).map_err(|e| Error::Compile { name: spec.symbol(), log: e.to_string() })?;
        let embedded = embedded_images().iter().find(|(n, a, _)| *n == unit.name && *a == self.target);
        let load = |cubin: &[u8]| -> Result<Arc<CudaModule>> { Ok(self.ctx.load_module(Ptx::from_binary(cubin.to_vec()))?) };
        let m = match embedded {
            Some((_, _, img)) => load(img)?,
            // A cached image the driver refuses is evicted and compiled again.
            None => jit::compile_and_load(&unit, &self.target, load)?,
        };
        cache.insert(spec, m.clone());
        Ok(m)
    }

    /// Entry point `entry` of `spec`, with `dyn_smem` bytes of dynamic shared memory allowed.
    /// Looked up once per (spec, entry); later calls are a hash-map hit.
    pub fn function(&self, spec: &KernelSpec, entry: &str, dyn_smem: u32) -> Result<CudaFunction> {
        let mut s = *spec;
        s.arch = self.arch;
        let key = (s, entry.to_string());
        let mut fns = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((f, allowed)) = fns.get_mut(&key) {
            if dyn_smem <= *allowed {
                return Ok(f.clone());
            }
        }
        let m = self.module(&s)?;
        let f = m.load_function(&format!("{}_{}", s.symbol(), entry))?;
        if dyn_smem > 48 * 1024 {
            if dyn_smem > self.max_smem_optin {
                return Err(Error::Unsupported(format!("{} needs {dyn_smem} bytes of shared memory, the device allows {}", s.symbol(), self.max_smem_optin)));
            }
            f.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dyn_smem as i32)?;
        }
        fns.insert(key, (f.clone(), dyn_smem.max(48 * 1024)));
        Ok(f)
    }

    /// Wait for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
}
