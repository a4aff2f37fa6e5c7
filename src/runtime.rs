//! The runtime: a CUDA context and the stream natsl launches on, the device's
//! properties, and the module cache (embedded image, else disk cache, else NVRTC).
//!
//! # Ownership
//! - [`Runtime::new`] retains the device's primary context and creates a stream of
//!   its own; both are released when the last clone of the runtime (and every cudarc
//!   object made from them) is dropped.
//! - [`Runtime::from_stream`] runs on a cudarc stream of the caller (its own or one
//!   wrapped with `CudaContext::wrap_borrowed_stream`): natsl keeps the `Arc`s, so
//!   the context lives as long as the runtime; a borrowed stream must outlive it.
//! - [`Runtime::from_raw_stream`] (and the C ABI) takes the calling thread's current
//!   context and a raw `CUstream`; neither is ever destroyed by natsl.
//! - [`Runtime::on_stream`] gives a runtime for another stream of the same context
//!   that shares the module cache (what the C ABI does per call).
//!
//! Modules and functions are cached per context and shared by all these views.
//! Compiling a unit locks only that unit: calls that use other units go on.

use crate::error::{Error, Result};
use crate::faults::DeviceFaults;
use crate::jit;
use crate::tensor::ContextId;
use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;
use natsl_codegen::{Arch, KernelSpec};
use std::collections::HashMap;
use std::mem::ManuallyDrop;
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

/// Streams per device that can run persistent kernels (one counter pair each).
const TILE_COUNTER_SLOTS: usize = 256;

type ModuleSlot = Arc<Mutex<Option<Arc<CudaModule>>>>;

/// What every runtime of one context shares: properties and the module cache.
struct Device {
    ctx: Arc<CudaContext>,
    arch: Arch,
    /// The real target images are built for: `sm_90a` for the Hopper path, the
    /// device's own `sm_XY` for the sm_80 path (cubins run only on their major arch).
    target: String,
    sm_count: u32,
    max_smem_optin: u32,
    /// One slot per unit: the map lock is held only to find the slot, the slot's
    /// lock while that unit loads or compiles.
    modules: Mutex<HashMap<KernelSpec, ModuleSlot>>,
    functions: Mutex<HashMap<(KernelSpec, String), (CudaFunction, u32)>>,
    /// Tile-scheduler counters of persistent kernels: `TILE_COUNTER_SLOTS` pairs of i32,
    /// and the slot of each stream (keyed by its `CUstream`): launches on one stream are
    /// ordered, so one pair per stream is never used by two launches at once. A pair is
    /// zeroed on its stream when the slot is assigned (ordered before the stream's first
    /// persistent launch), and every launch that completes leaves it at zero (its last
    /// CTA rewinds it). A launch that does not complete is a kernel fault, which in CUDA
    /// is a sticky error of the whole context: this buffer, every natsl buffer and the
    /// context are then unusable, and the engine must drop every runtime of the context,
    /// reset it and build new ones (whose counters start at zero). A launch that fails
    /// before it runs (a launch error) never touches the pair. Nothing `Runtime` exposes
    /// writes the counters.
    tile_counters: (CudaSlice<i32>, Mutex<HashMap<usize, usize>>),
    /// The device fault word (`NATSL_FAULT_*` bits; see [`Runtime::device_faults`]).
    faults: CudaSlice<u32>,
    /// A context natsl did not create and must never destroy (a caller's
    /// non-primary context): this reference is never dropped, so cudarc's
    /// `cuCtxDestroy` never runs.
    _borrowed: Option<ManuallyDrop<Arc<CudaContext>>>,
}

/// The device, its module cache, and the stream every natsl launch of this
/// runtime is queued on. Cheap to clone (clones share the cache and the stream).
///
/// Buffers that other streams also use must be ordered with [`Runtime::stream`] by
/// the caller (events or stream waits). Runtimes that natsl creates itself turn off
/// cudarc's per-buffer event tracking for their own context wrapper; a runtime over
/// the caller's cudarc stream leaves the caller's setting as it is.
#[derive(Clone)]
pub struct Runtime {
    dev: Arc<Device>,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("arch", &self.dev.arch).field("sm_count", &self.dev.sm_count).finish()
    }
}

/// One unit done by [`Runtime::warmup`].
#[derive(Clone, Debug)]
pub struct WarmupProgress<'a> {
    /// Units finished so far (this one included) and in all.
    pub done: usize,
    pub total: usize,
    /// The unit's symbol (`natsl_gdn_prefill_...`).
    pub unit: &'a str,
    /// Wall time of this unit: ~0 when already loaded, milliseconds from the disk
    /// cache or an embedded image, seconds when NVRTC compiled it.
    pub seconds: f64,
    /// The error, if this unit failed (warmup goes on with the others).
    pub error: Option<&'a Error>,
}

fn no_device(e: impl std::fmt::Debug) -> Error {
    Error::NoDevice(format!("{e:?}"))
}

fn check(r: sys::CUresult, what: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::NoDevice(format!("{what}: {r:?}")))
    }
}

impl Runtime {
    /// Open device `ordinal` with its best code path (`sm_90a` on Hopper, else `sm_80`):
    /// its primary context and a new stream of natsl's own.
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
        let n = CudaContext::device_count().map_err(no_device)?;
        if ordinal >= n.max(0) as usize {
            return Err(Error::NoDevice(format!("device {ordinal} requested, {n} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(no_device)?;
        // natsl queues all of its work on one stream, so cudarc's per-buffer event
        // tracking would only add driver calls to every launch (measured: it
        // dominated the host cost of small launches). This wrapper is natsl's own.
        // SAFETY: callers that use natsl buffers on other streams must order that
        // work themselves (documented on `Runtime`).
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own (not the legacy default stream): capturable into
        // CUDA graphs, and ordered with the caller's work only through events.
        let stream = ctx.new_stream()?;
        Self::build(ctx, stream, force, None)
    }

    /// Run on the caller's cudarc stream (and its context), best code path.
    /// The runtime keeps the stream's `Arc`; a stream made with
    /// `wrap_borrowed_stream` must stay alive as long as the runtime and its clones.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Runtime> {
        Self::from_stream_with_arch(stream, None)
    }

    /// [`Runtime::from_stream`] with a forced code path (`None`: the best).
    pub fn from_stream_with_arch(stream: Arc<CudaStream>, arch: Option<Arch>) -> Result<Runtime> {
        let ctx = stream.context().clone();
        Self::build(ctx, stream, arch, None)
    }

    /// Run on a raw `CUstream` of the calling thread's current context (what the
    /// C ABI does). A primary context is retained (and released on drop), any other
    /// context is only borrowed. Neither the context nor the stream is destroyed.
    ///
    /// # Safety
    /// A context must be current on this thread; `stream` must be a stream of that
    /// context (or null, the legacy default stream, or `CU_STREAM_PER_THREAD`), and
    /// both must stay valid while the runtime or any clone of it is in use. The
    /// caller orders natsl's work with other streams.
    pub unsafe fn from_raw_stream(stream: sys::CUstream) -> Result<Runtime> {
        if !driver_present() {
            return Err(Error::NoDevice("libcuda not found".into()));
        }
        let (ctx, borrowed) = current_context()?;
        ctx.disable_event_tracking();
        check_stream_context(&ctx, stream)?;
        let s = ctx.wrap_borrowed_stream(stream);
        Self::build(ctx, s, None, borrowed)
    }

    fn build(ctx: Arc<CudaContext>, stream: Arc<CudaStream>, force: Option<Arch>, borrowed: Option<Arc<CudaContext>>) -> Result<Runtime> {
        let (major, minor) = ctx.compute_capability()?;
        let best = Arch::for_capability(major, minor).ok_or_else(|| Error::Unsupported(format!("compute capability {major}.{minor} (natsl needs 8.0+)")))?;
        let arch = match force {
            Some(Arch::Sm90a) if best != Arch::Sm90a => return Err(Error::Unsupported(format!("sm_90a path on compute capability {major}.{minor}"))),
            Some(a) => a,
            None => best,
        };
        let sm_count = ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_smem_optin = ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        let target = match arch {
            Arch::Sm90a => "sm_90a".to_string(),
            Arch::Sm80 => format!("sm_{major}{minor}"),
        };
        // Allocated (and zeroed) here, never inside a call: calls stay capturable.
        let counters = stream.alloc_zeros::<i32>(2 * TILE_COUNTER_SLOTS)?;
        let faults = stream.alloc_zeros::<u32>(1)?;
        stream.synchronize()?;
        let dev = Device {
            tile_counters: (counters, Mutex::new(HashMap::new())),
            faults,
            ctx,
            arch,
            target,
            sm_count,
            max_smem_optin,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            _borrowed: borrowed.map(ManuallyDrop::new),
        };
        Ok(Runtime { dev: Arc::new(dev), stream })
    }

    /// The device address of this stream's pair of tile-scheduler counters (see
    /// `NatslSparsePrefillParams::tile_counter` and `Device::tile_counters`). The first
    /// call on a stream zeroes the pair on that stream (an async memset: inside a graph
    /// capture it becomes a node of the graph, harmless on every replay).
    pub(crate) fn tile_counter(&self) -> Result<u64> {
        let (buf, map) = &self.dev.tile_counters;
        let key = self.stream.cu_stream() as usize;
        let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
        let (slot, fresh) = counter_slot(&mut m, key)?;
        let (base, _guard) = buf.device_ptr(&self.stream);
        let ptr = base + (slot * 2 * std::mem::size_of::<i32>()) as u64;
        if fresh {
            // SAFETY: the pair is 8 live bytes of the counter buffer; queued on the stream
            // that runs every launch using the pair, so it precedes them all.
            if let Err(e) = unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, 2 * std::mem::size_of::<i32>(), self.stream.cu_stream()) } {
                m.remove(&key);
                return Err(e.into());
            }
        }
        Ok(ptr)
    }

    /// The device address of the fault word that kernels set bits of (the params'
    /// `faults`): one per device, shared by every stream (bits are only ever or-ed in).
    pub(crate) fn fault_word(&self) -> u64 {
        let (ptr, _guard) = self.dev.faults.device_ptr(&self.stream);
        ptr
    }

    /// Faults the kernels recorded on this runtime's device since the last call: inputs
    /// in device memory that no host check can see without a sync (state-pool indices,
    /// labels, page tables and lengths), each treated as its bit documents
    /// ([`DeviceFaults`]). Reads and clears the word on this runtime's stream and waits
    /// for it, so call it outside the hot path and outside graph capture, after the
    /// calls of interest (on other streams: after they are synchronised).
    pub fn device_faults(&self) -> Result<DeviceFaults> {
        let mut host = [0u32; 1];
        self.stream.memcpy_dtoh(&self.dev.faults, &mut host)?;
        let (ptr, _guard) = self.dev.faults.device_ptr(&self.stream);
        // SAFETY: ptr is the live 4-byte fault word of this device; the memset is
        // ordered on this stream after the read above.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, 4, self.stream.cu_stream()) }?;
        self.stream.synchronize()?;
        Ok(DeviceFaults(host[0]))
    }

    /// This runtime (same device, module cache and code path) on another cudarc
    /// stream of the same context.
    pub fn on_stream(&self, stream: Arc<CudaStream>) -> Result<Runtime> {
        if **stream.context() != *self.dev.ctx {
            return Err(Error::invalid("stream", "belongs to another CUDA context than the runtime"));
        }
        Ok(Runtime { dev: self.dev.clone(), stream })
    }

    /// This runtime on a raw `CUstream` (checked to belong to the runtime's context).
    ///
    /// # Safety
    /// `stream` must be a valid stream (or null / `CU_STREAM_PER_THREAD`) and stay
    /// valid while the returned runtime is in use.
    pub unsafe fn on_raw_stream(&self, stream: sys::CUstream) -> Result<Runtime> {
        check_stream_context(&self.dev.ctx, stream)?;
        Ok(Runtime { dev: self.dev.clone(), stream: self.dev.ctx.wrap_borrowed_stream(stream) })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.dev.ctx
    }
    /// What every tensor of a launch is compared with ([`crate::TensorRef::context`]).
    pub fn context_id(&self) -> ContextId {
        ContextId::of(&self.dev.ctx)
    }
    /// The stream every launch of this runtime is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn arch(&self) -> Arch {
        self.dev.arch
    }
    /// The real target kernels are compiled for (`sm_90a`, or e.g. `sm_90` for the sm_80 path on an H200).
    pub fn target(&self) -> &str {
        &self.dev.target
    }
    pub fn sm_count(&self) -> u32 {
        self.dev.sm_count
    }
    /// Largest dynamic shared memory a block can opt in to.
    pub fn max_smem_optin(&self) -> u32 {
        self.dev.max_smem_optin
    }

    /// The module of `spec` (for this runtime's arch), loading or compiling it on
    /// first use. Only callers of the same unit wait while it compiles.
    pub fn module(&self, spec: &KernelSpec) -> Result<Arc<CudaModule>> {
        let mut spec = *spec;
        spec.arch = self.dev.arch;
        let slot = self.dev.modules.lock().unwrap_or_else(|p| p.into_inner()).entry(spec).or_default().clone();
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        let unit = natsl_codegen::emit(&spec).map_err(|e| Error::Compile { name: spec.symbol(), log: e.to_string() })?;
        let embedded = embedded_images().iter().find(|(n, a, _)| *n == unit.name && *a == self.dev.target);
        let load = |cubin: &[u8]| -> Result<Arc<CudaModule>> { Ok(self.dev.ctx.load_module(Ptx::from_binary(cubin.to_vec()))?) };
        let m = match embedded {
            Some((_, _, img)) => load(img)?,
            // A cached image the driver refuses is evicted and compiled again.
            None => jit::compile_and_load(&unit, &self.dev.target, load)?,
        };
        *slot = Some(m.clone());
        Ok(m)
    }

    /// Entry point `entry` of `spec`, with `dyn_smem` bytes of dynamic shared memory allowed.
    /// Looked up once per (spec, entry); later calls are a hash-map hit.
    pub fn function(&self, spec: &KernelSpec, entry: &str, dyn_smem: u32) -> Result<CudaFunction> {
        let mut s = *spec;
        s.arch = self.dev.arch;
        let key = (s, entry.to_string());
        if let Some((f, allowed)) = self.dev.functions.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            if dyn_smem <= *allowed {
                return Ok(f.clone());
            }
        }
        // Outside the functions lock: this may compile.
        let m = self.module(&s)?;
        let mut fns = self.dev.functions.lock().unwrap_or_else(|p| p.into_inner());
        // The attribute belongs to the CUfunction that every clone shares: only raise it.
        let allowed = fns.get(&key).map_or(48 * 1024, |e| e.1).max(dyn_smem);
        let f = m.load_function(&format!("{}_{}", s.symbol(), entry))?;
        if allowed > 48 * 1024 {
            if allowed > self.dev.max_smem_optin {
                return Err(Error::Unsupported(format!("{} needs {dyn_smem} bytes of shared memory, the device allows {}", s.symbol(), self.dev.max_smem_optin)));
            }
            f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, allowed as i32)?;
        }
        fns.insert(key, (f.clone(), allowed));
        Ok(f)
    }

    /// Load or compile `specs` ahead of time (each for this runtime's arch), on up to
    /// one thread per core; `progress` is called once per unit as it finishes. Units
    /// already loaded cost nothing, so calling it again is cheap. Returns the first
    /// error after every unit was tried.
    pub fn warmup_with<F: FnMut(&WarmupProgress) + Send>(&self, specs: &[KernelSpec], progress: F) -> Result<()> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let mut specs: Vec<KernelSpec> = specs.iter().map(|s| KernelSpec { arch: self.dev.arch, ..*s }).collect();
        specs.sort();
        specs.dedup();
        let total = specs.len();
        let next = AtomicUsize::new(0);
        let state = Mutex::new((0usize, None::<Error>, progress));
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(total).max(1);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(spec) = specs.get(i) else { break };
                    let t0 = std::time::Instant::now();
                    let r = self.module(spec);
                    let seconds = t0.elapsed().as_secs_f64();
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    st.0 += 1;
                    let unit = spec.symbol();
                    let err = r.err();
                    let p = WarmupProgress { done: st.0, total, unit: &unit, seconds, error: err.as_ref() };
                    (st.2)(&p);
                    if st.1.is_none() {
                        st.1 = err;
                    }
                });
            }
        });
        match state.into_inner().unwrap_or_else(|p| p.into_inner()).1 {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// [`Runtime::warmup_with`], printing one line per unit to stderr
    /// (`natsl: warmup [3/12] natsl_gdn_prefill_... 41.2 s`).
    pub fn warmup(&self, specs: &[KernelSpec]) -> Result<()> {
        self.warmup_with(specs, |p| {
            let status = p.error.map_or(String::new(), |e| format!(" FAILED: {e}"));
            eprintln!("natsl: warmup [{}/{}] {} {:.2} s{status}", p.done, p.total, p.unit, p.seconds);
        })
    }

    /// Wait for all work queued on this runtime's stream.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
}

/// The counter slot of stream `key` in `map` (`TILE_COUNTER_SLOTS` at most) and whether it
/// was assigned now (then its pair must be zeroed before use).
fn counter_slot(map: &mut HashMap<usize, usize>, key: usize) -> Result<(usize, bool)> {
    if let Some(&slot) = map.get(&key) {
        return Ok((slot, false));
    }
    let slot = map.len();
    if slot >= TILE_COUNTER_SLOTS {
        return Err(Error::Unsupported(format!("more than {TILE_COUNTER_SLOTS} streams ran persistent kernels on one runtime's device")));
    }
    map.insert(key, slot);
    Ok((slot, true))
}

/// The calling thread's current context: (wrapper, the reference to keep forever
/// when the context is not natsl's to release).
///
/// # Safety
/// The current context must stay valid while the wrapper is used.
unsafe fn current_context() -> Result<(Arc<CudaContext>, Option<Arc<CudaContext>>)> {
    // cuInit is idempotent; a current context implies it ran, but be safe.
    check(sys::cuInit(0), "cuInit")?;
    let mut cu_ctx: sys::CUcontext = std::ptr::null_mut();
    check(sys::cuCtxGetCurrent(&mut cu_ctx), "cuCtxGetCurrent")?;
    if cu_ctx.is_null() {
        return Err(Error::NoDevice("no CUDA context is current on this thread (make one current, e.g. torch.cuda.set_device, cudaSetDevice or cuCtxSetCurrent)".into()));
    }
    let mut dev: sys::CUdevice = 0;
    check(sys::cuCtxGetDevice(&mut dev), "cuCtxGetDevice")?;
    let n = CudaContext::device_count().map_err(no_device)?;
    let mut ordinal = None;
    for i in 0..n {
        let mut d: sys::CUdevice = 0;
        check(sys::cuDeviceGet(&mut d, i), "cuDeviceGet")?;
        if d == dev {
            ordinal = Some(i as usize);
        }
    }
    let ordinal = ordinal.ok_or_else(|| Error::NoDevice(format!("the current context's device {dev} is not among the {n} devices")))?;
    // Is it the device's primary context (what the CUDA runtime and torch use)?
    // Only an active primary context is retained for the comparison, so none is created.
    let (mut flags, mut active) = (0u32, 0i32);
    check(sys::cuDevicePrimaryCtxGetState(dev, &mut flags, &mut active), "cuDevicePrimaryCtxGetState")?;
    if active != 0 {
        let mut primary: sys::CUcontext = std::ptr::null_mut();
        check(sys::cuDevicePrimaryCtxRetain(&mut primary, dev), "cuDevicePrimaryCtxRetain")?;
        let same = primary == cu_ctx;
        check(sys::cuDevicePrimaryCtxRelease_v2(dev), "cuDevicePrimaryCtxRelease")?;
        if same {
            // Retains the primary context again; released when the runtime is dropped.
            return Ok((CudaContext::new(ordinal).map_err(no_device)?, None));
        }
    }
    let ctx = CudaContext::from_raw_context(ordinal, dev, cu_ctx).map_err(no_device)?;
    Ok((ctx.clone(), Some(ctx)))
}

/// A stream must belong to the runtime's context (the legacy and per-thread
/// handles resolve to the current context).
///
/// # Safety
/// `stream` must be a valid stream handle.
unsafe fn check_stream_context(ctx: &CudaContext, stream: sys::CUstream) -> Result<()> {
    let mut c: sys::CUcontext = std::ptr::null_mut();
    let r = sys::cuStreamGetCtx(stream, &mut c);
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::invalid("stream", format!("not a valid CUDA stream ({r:?})")));
    }
    if c != ctx.cu_ctx() {
        return Err(Error::invalid("stream", "belongs to another CUDA context than the runtime"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_slots_are_fresh_once_and_bounded() {
        let mut m = HashMap::new();
        assert_eq!(counter_slot(&mut m, 7).unwrap(), (0, true));
        assert_eq!(counter_slot(&mut m, 7).unwrap(), (0, false), "a stream keeps its pair, zeroed only once");
        assert_eq!(counter_slot(&mut m, 0).unwrap(), (1, true), "the legacy stream (handle 0) is a stream like others");
        for key in 100..100 + TILE_COUNTER_SLOTS - 2 {
            assert!(counter_slot(&mut m, key).unwrap().1);
        }
        // Every slot is taken: a new stream is refused and takes none, known ones go on.
        assert!(matches!(counter_slot(&mut m, 1), Err(Error::Unsupported(_))));
        assert_eq!(m.len(), TILE_COUNTER_SLOTS);
        assert_eq!(counter_slot(&mut m, 0).unwrap(), (1, false));
        let mut slots: Vec<usize> = m.values().copied().collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..TILE_COUNTER_SLOTS).collect::<Vec<_>>(), "slots are distinct");
    }
}
