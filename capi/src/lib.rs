//! The C ABI of natsl (`include/natsl.h`, generated from this file by cbindgen).
//!
//! Conventions (also in the header):
//! - Every call returns a [`NatslStatus`]; on failure [`natsl_last_error`] gives
//!   the message (thread-local, naming the bad argument for `NATSL_STATUS_INVALID_ARGUMENT`).
//! - No panic crosses the boundary: a panic inside natsl returns `NATSL_STATUS_PANIC`.
//! - Tensors are [`NatslTensor`] descriptors of device memory (pointer, dtype, shape,
//!   strides in elements); nothing is copied.
//! - Calls that launch take a `CUstream` (`cudaStream_t`) of the context that was
//!   current when the runtime was created; the caller's current context is restored
//!   before each call returns.
//! - Handles are created and destroyed by the caller; a handle is used by one thread
//!   at a time (a runtime may be shared: its calls are thread-safe).

#![allow(clippy::missing_safety_doc)] // every extern fn documents its contract in the header

use cudarc::driver::sys;
use natsl::ops::{gdn, merge, sparse, ModelKernels};
use natsl::{Batch, DType, Error, Runtime, Scratch, TensorMut, TensorRef};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Version of this ABI: bumped on any incompatible change of the header.
pub const NATSL_ABI_VERSION: u32 = 1;
/// Largest tensor rank a [`NatslTensor`] describes.
pub const NATSL_MAX_DIMS: usize = 4;

/// Result of every call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatslStatus {
    Ok = 0,
    /// An argument is malformed (the message names it).
    InvalidArgument = 1,
    /// Valid, but not supported by this build or device (e.g. a head dim).
    Unsupported = 2,
    /// No CUDA driver, device or current context.
    NoDevice = 3,
    /// NVRTC is missing or of the wrong major version.
    NvrtcUnavailable = 4,
    /// A kernel failed to compile (a bug of natsl; the message has the log).
    CompileError = 5,
    /// A CUDA driver call failed.
    DriverError = 6,
    /// File I/O (the disk cache).
    IoError = 7,
    /// natsl panicked (a bug); the state of the handles involved is unspecified.
    Panic = 8,
}

/// Element types (the `dtype` field of [`NatslTensor`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatslDtype {
    Bf16 = 0,
    F16 = 1,
    F32 = 2,
    I32 = 3,
    U8 = 4,
}

/// Router policies for [`NatslModel`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatslRouter {
    None = 0,
    Argmax = 1,
    /// Top-k or keep-fraction budgets (run-time k).
    Budget = 2,
}

/// A strided view of device memory. `ptr == 0` marks an absent optional argument.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NatslTensor {
    /// Device address (of the runtime's context).
    pub ptr: u64,
    /// A `NatslDtype` value.
    pub dtype: i32,
    /// Rank, 1..=NATSL_MAX_DIMS.
    pub ndim: i32,
    pub shape: [i64; NATSL_MAX_DIMS],
    /// Strides in elements (>= 0; the last dimension must be contiguous).
    pub strides: [i64; NATSL_MAX_DIMS],
    /// Elements addressable from `ptr` (bounds checks); 0 = the view's own extent.
    pub capacity: i64,
}

/// What a model calls, for [`natsl_runtime_warmup`]. Head dims 0 = not used.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NatslModel {
    /// `NATSL_DTYPE_BF16` or `NATSL_DTYPE_F16`.
    pub dtype: i32,
    pub gdn_dk: i32,
    pub gdn_dv: i32,
    pub sparse_dk: i32,
    pub sparse_dv: i32,
    /// A `NatslRouter` value.
    pub router: i32,
}

/// Called once per unit by [`natsl_runtime_warmup`]: (units done, total, unit name,
/// seconds, status of this unit, user data).
pub type NatslProgressFn = Option<unsafe extern "C" fn(done: u64, total: u64, unit: *const c_char, seconds: f64, status: NatslStatus, user: *mut c_void)>;

/// GDN prefill (see `natsl::ops::gdn::gdn_prefill`). q, k `[T, Hqk, dk]`, v `[T, Hv, dv]`,
/// g `[T, Hv]` f32, beta `[T, Hv]`, labels `[num_slots, Hr]` u8 (optional), o `[T, Hv, dv]`.
/// Pools `[P, Hv, dk, dv]` f32 (optional) with optional i32 `[N]` device indices: an
/// entry outside `[0, P)` starts from zeros (h0) or is not written (outputs).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NatslGdnPrefillArgs {
    pub q: NatslTensor,
    pub k: NatslTensor,
    pub v: NatslTensor,
    pub g: NatslTensor,
    pub beta: NatslTensor,
    pub labels: NatslTensor,
    pub h0: NatslTensor,
    pub h0_index: NatslTensor,
    pub o: NatslTensor,
    pub committed: NatslTensor,
    pub committed_index: NatslTensor,
    pub running: NatslTensor,
    pub running_index: NatslTensor,
    pub gsum_running: NatslTensor,
    /// Output scale; 0 = dk^-1/2.
    pub scale: f32,
    /// 1: L2-normalise q and k rows in the kernel.
    pub l2norm: i32,
}

/// GDN decode step (see `natsl::ops::gdn::gdn_decode`): `tokens_per_seq` (1..=8)
/// tokens per sequence; running / committed pools updated in place through device
/// indices; committed, gsum `[N, Hv]` f32 and pos `[N]` i32 enable the chunk commit.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NatslGdnDecodeArgs {
    pub q: NatslTensor,
    pub k: NatslTensor,
    pub v: NatslTensor,
    pub g: NatslTensor,
    pub beta: NatslTensor,
    pub labels: NatslTensor,
    pub o: NatslTensor,
    pub running: NatslTensor,
    pub running_index: NatslTensor,
    pub committed: NatslTensor,
    pub committed_index: NatslTensor,
    pub gsum: NatslTensor,
    pub pos: NatslTensor,
    pub tokens_per_seq: i32,
    pub scale: f32,
    pub l2norm: i32,
}

/// Block-sparse prefill over the router's lists (see `natsl::ops::sparse::prefill`):
/// q `[T, Hq, dk]`, k `[T, Hkv, dk]`, v `[T, Hkv, dv]`, attn_list i32 `[Hr, num_slots]`,
/// attn_count i32 `[N, Hr]`, o `[T, Hq, dv]`, lse `[T, Hq]` f32 (optional),
/// q_norm_w / k_norm_w `[dk]` (optional RMSNorm weights).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NatslSparsePrefillArgs {
    pub q: NatslTensor,
    pub k: NatslTensor,
    pub v: NatslTensor,
    pub attn_list: NatslTensor,
    pub attn_count: NatslTensor,
    pub o: NatslTensor,
    pub lse: NatslTensor,
    pub q_norm_w: NatslTensor,
    pub k_norm_w: NatslTensor,
    /// Softmax scale; 0 = dk^-1/2.
    pub scale: f32,
}

/// The merge epilogue (see `natsl::ops::merge::merge`): o_gdn, o_att, z, out
/// `[T, Ha, dvs]` (activation dtype, any 16-byte-aligned token and head strides),
/// w `[T, Ha, 2]` logits (f32 or the activation dtype; weight 0 = the GDN branch),
/// gamma_gdn, gamma_att `[dvs]`. out may not overlap any input.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NatslMergeArgs {
    pub o_gdn: NatslTensor,
    pub o_att: NatslTensor,
    pub w: NatslTensor,
    pub gamma_gdn: NatslTensor,
    pub gamma_att: NatslTensor,
    pub z: NatslTensor,
    pub out: NatslTensor,
}

/// Paged sparse decode (see `natsl::ops::sparse::decode`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NatslSparseDecodeArgs {
    pub q: NatslTensor,
    pub k_pages: NatslTensor,
    pub v_pages: NatslTensor,
    pub page_table: NatslTensor,
    pub page_count: NatslTensor,
    pub cur_page: NatslTensor,
    pub cur_len: NatslTensor,
    pub o: NatslTensor,
    pub lse: NatslTensor,
    pub q_norm_w: NatslTensor,
    pub k_norm_w: NatslTensor,
    /// New queries per sequence (1..=8).
    pub num_queries: i32,
    /// 0 = chosen to fill the GPU.
    pub num_splits: i32,
    pub scale: f32,
}

/// A device, its module cache and code path (opaque).
pub struct NatslRuntime {
    rt: Runtime,
}

/// A validated packed batch: host `cu_seqlens` and a device copy (opaque).
pub struct NatslBatch {
    batch: Batch,
}

/// Device scratch memory of an op (opaque): natsl's own or the caller's.
pub struct NatslWorkspace {
    scratch: Scratch,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn status_of(e: &Error) -> NatslStatus {
    match e {
        Error::InvalidArgument { .. } => NatslStatus::InvalidArgument,
        Error::Unsupported(_) => NatslStatus::Unsupported,
        Error::NoDevice(_) => NatslStatus::NoDevice,
        Error::NvrtcUnavailable(_) => NatslStatus::NvrtcUnavailable,
        Error::Compile { .. } => NatslStatus::CompileError,
        Error::Driver(_) => NatslStatus::DriverError,
        Error::Io(_) => NatslStatus::IoError,
    }
}

/// Run `f` with panics caught; errors become a status and the thread's last error.
fn guard(f: impl FnOnce() -> Result<(), Error>) -> NatslStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => NatslStatus::Ok,
        Ok(Err(e)) => {
            set_error(e.to_string());
            status_of(&e)
        }
        Err(p) => {
            let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into());
            set_error(format!("natsl panicked (a bug, please report): {msg}"));
            NatslStatus::Panic
        }
    }
}

/// Restores the calling thread's current context on drop (cudarc binds the
/// runtime's context to the thread for its calls).
struct KeepCurrentContext(Option<sys::CUcontext>);

impl KeepCurrentContext {
    fn new() -> Self {
        if !natsl::runtime::driver_present() {
            return KeepCurrentContext(None);
        }
        let mut c: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: plain driver query into a local.
        let ok = unsafe { sys::cuCtxGetCurrent(&mut c) } == sys::CUresult::CUDA_SUCCESS;
        KeepCurrentContext(ok.then_some(c))
    }
}

impl Drop for KeepCurrentContext {
    fn drop(&mut self) {
        if let Some(saved) = self.0 {
            let mut now: sys::CUcontext = std::ptr::null_mut();
            // SAFETY: `saved` was current on this thread when the call began.
            unsafe {
                if sys::cuCtxGetCurrent(&mut now) == sys::CUresult::CUDA_SUCCESS && now != saved {
                    let _ = sys::cuCtxSetCurrent(saved);
                }
            }
        }
    }
}

fn nonnull<'a, T>(p: *const T, arg: &'static str) -> Result<&'a T, Error> {
    // SAFETY: the header requires valid pointers; null is checked here.
    unsafe { p.as_ref() }.ok_or_else(|| Error::invalid(arg, "null pointer"))
}

fn nonnull_mut<'a, T>(p: *mut T, arg: &'static str) -> Result<&'a mut T, Error> {
    // SAFETY: as above.
    unsafe { p.as_mut() }.ok_or_else(|| Error::invalid(arg, "null pointer"))
}

fn dtype_of(d: i32, arg: &'static str) -> Result<DType, Error> {
    Ok(match d {
        0 => DType::Bf16,
        1 => DType::F16,
        2 => DType::F32,
        3 => DType::I32,
        4 => DType::U8,
        _ => return Err(Error::invalid(arg, format!("dtype {d} is not a NatslDtype"))),
    })
}

/// Shape, strides and capacity of a descriptor, checked for sign and rank.
fn dims(t: &NatslTensor, arg: &'static str) -> Result<(DType, Vec<usize>, Vec<usize>, usize), Error> {
    let dtype = dtype_of(t.dtype, arg)?;
    if !(1..=NATSL_MAX_DIMS as i32).contains(&t.ndim) {
        return Err(Error::invalid(arg, format!("ndim {} (must be 1..={NATSL_MAX_DIMS})", t.ndim)));
    }
    let n = t.ndim as usize;
    if t.shape[..n].iter().chain(&t.strides[..n]).any(|&x| x < 0) || t.capacity < 0 {
        return Err(Error::invalid(arg, format!("negative shape, stride or capacity (shape {:?}, strides {:?})", &t.shape[..n], &t.strides[..n])));
    }
    let shape: Vec<usize> = t.shape[..n].iter().map(|&x| x as usize).collect();
    let strides: Vec<usize> = t.strides[..n].iter().map(|&x| x as usize).collect();
    let extent = shape.iter().zip(&strides).try_fold(1usize, |acc, (&s, &st)| s.checked_sub(1).map_or(Some(acc), |m| m.checked_mul(st).and_then(|x| x.checked_add(acc))));
    let extent = extent.ok_or_else(|| Error::invalid(arg, "strides overflow"))?;
    let cap = if t.capacity == 0 { extent } else { t.capacity as usize };
    Ok((dtype, shape, strides, cap))
}

/// # Safety
/// The descriptor must describe device memory valid for the call (header contract).
unsafe fn view<'a>(t: &NatslTensor, arg: &'static str) -> Result<TensorRef<'a>, Error> {
    if t.ptr == 0 {
        return Err(Error::invalid(arg, "required, but its ptr is 0"));
    }
    let (dtype, shape, strides, cap) = dims(t, arg)?;
    Ok(TensorRef::from_raw(t.ptr, cap, dtype, &shape, &strides))
}

/// # Safety
/// As [`view`]; the memory is written by the call.
unsafe fn view_mut<'a>(t: &NatslTensor, arg: &'static str) -> Result<TensorMut<'a>, Error> {
    if t.ptr == 0 {
        return Err(Error::invalid(arg, "required, but its ptr is 0"));
    }
    let (dtype, shape, strides, cap) = dims(t, arg)?;
    Ok(TensorMut::from_raw(t.ptr, cap, dtype, &shape, &strides))
}

/// # Safety
/// As [`view`].
unsafe fn opt<'a>(t: &NatslTensor, arg: &'static str) -> Result<Option<TensorRef<'a>>, Error> {
    if t.ptr == 0 {
        Ok(None)
    } else {
        view(t, arg).map(Some)
    }
}

/// # Safety
/// As [`view_mut`].
unsafe fn opt_mut<'a>(t: &NatslTensor, arg: &'static str) -> Result<Option<TensorMut<'a>>, Error> {
    if t.ptr == 0 {
        Ok(None)
    } else {
        view_mut(t, arg).map(Some)
    }
}

/// # Safety
/// As [`view`].
unsafe fn merge_views<'a>(a: &NatslMergeArgs) -> Result<merge::MergeInputs<'a>, Error> {
    Ok(merge::MergeInputs {
        o_gdn: view(&a.o_gdn, "o_gdn")?,
        o_att: view(&a.o_att, "o_att")?,
        w: view(&a.w, "w")?,
        gamma_gdn: view(&a.gamma_gdn, "gamma_gdn")?,
        gamma_att: view(&a.gamma_att, "gamma_att")?,
        z: view(&a.z, "z")?,
    })
}

fn scale_of(s: f32) -> Option<f32> {
    (s != 0.0).then_some(s)
}

/// # Safety
/// Descriptors as in the header.
unsafe fn gdn_prefill_views<'a>(a: &NatslGdnPrefillArgs) -> Result<(gdn::GdnPrefillInputs<'a>, gdn::GdnPrefillOutputs<'a>, gdn::GdnOptions), Error> {
    let index = |t: &NatslTensor, arg| -> Result<Option<gdn::PoolIndex<'a>>, Error> { Ok(opt(t, arg)?.map(gdn::PoolIndex::Device)) };
    for (pool, ix, arg) in [(&a.h0, &a.h0_index, "h0_index"), (&a.committed, &a.committed_index, "committed_index"), (&a.running, &a.running_index, "running_index")] {
        if pool.ptr == 0 && ix.ptr != 0 {
            return Err(Error::invalid(arg, "an index without its pool"));
        }
    }
    let inp = gdn::GdnPrefillInputs {
        q: view(&a.q, "q")?,
        k: view(&a.k, "k")?,
        v: view(&a.v, "v")?,
        g: view(&a.g, "g")?,
        beta: view(&a.beta, "beta")?,
        labels: opt(&a.labels, "labels")?,
        h0: match opt(&a.h0, "h0")? {
            Some(pool) => Some(gdn::PoolIn { pool, index: index(&a.h0_index, "h0_index")? }),
            None => None,
        },
    };
    let out = gdn::GdnPrefillOutputs {
        o: view_mut(&a.o, "o")?,
        committed: match opt_mut(&a.committed, "committed")? {
            Some(pool) => Some(gdn::PoolOut { pool, index: index(&a.committed_index, "committed_index")? }),
            None => None,
        },
        running: match opt_mut(&a.running, "running")? {
            Some(pool) => Some(gdn::PoolOut { pool, index: index(&a.running_index, "running_index")? }),
            None => None,
        },
        gsum_running: opt_mut(&a.gsum_running, "gsum_running")?,
    };
    Ok((inp, out, gdn::GdnOptions { scale: scale_of(a.scale), l2norm: a.l2norm != 0 }))
}

/// # Safety
/// Descriptors as in the header.
unsafe fn sparse_prefill_views<'a>(a: &NatslSparsePrefillArgs) -> Result<(TensorRef<'a>, TensorRef<'a>, TensorRef<'a>, sparse::BlockMask<'a>, sparse::SparseOptions<'a>), Error> {
    let mask = sparse::BlockMask::Routed { attn_list: view(&a.attn_list, "attn_list")?, attn_count: view(&a.attn_count, "attn_count")? };
    let opts = sparse::SparseOptions { scale: scale_of(a.scale), q_norm_w: opt(&a.q_norm_w, "q_norm_w")?, k_norm_w: opt(&a.k_norm_w, "k_norm_w")?, ..Default::default() };
    Ok((view(&a.q, "q")?, view(&a.k, "k")?, view(&a.v, "v")?, mask, opts))
}

fn host_slice<'a>(p: *const i32, len: i64, arg: &'static str) -> Result<&'a [i32], Error> {
    if p.is_null() || !(2..=i32::MAX as i64).contains(&len) {
        return Err(Error::invalid(arg, format!("null or length {len} (at least 2 entries)")));
    }
    // SAFETY: the header requires `len` readable i32 at `p`.
    Ok(unsafe { std::slice::from_raw_parts(p, len as usize) })
}

/// # Safety
/// `stream` must be a valid stream of the runtime's context.
unsafe fn on(rt: &NatslRuntime, stream: *mut c_void) -> Result<Runtime, Error> {
    rt.rt.on_raw_stream(stream as sys::CUstream)
}

// ---------------------------------------------------------------- exported

/// The message of the last failed call on this thread ("" if none). Valid until the
/// next failing natsl call on this thread.
#[no_mangle]
pub extern "C" fn natsl_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// natsl's version (semver of the Rust crate) and [`NATSL_ABI_VERSION`].
#[no_mangle]
pub unsafe extern "C" fn natsl_version(major: *mut u32, minor: *mut u32, patch: *mut u32, abi: *mut u32) -> NatslStatus {
    guard(|| {
        let v = |s: &str| s.parse::<u32>().unwrap_or(0);
        *nonnull_mut(major, "major")? = v(env!("CARGO_PKG_VERSION_MAJOR"));
        *nonnull_mut(minor, "minor")? = v(env!("CARGO_PKG_VERSION_MINOR"));
        *nonnull_mut(patch, "patch")? = v(env!("CARGO_PKG_VERSION_PATCH"));
        *nonnull_mut(abi, "abi")? = NATSL_ABI_VERSION;
        Ok(())
    })
}

/// The NVRTC major version this library loads (12 or 13, from its `cuda-*` feature).
#[no_mangle]
pub extern "C" fn natsl_nvrtc_major() -> i32 {
    natsl::jit::NVRTC_MAJOR
}

/// A runtime on the calling thread's current context (the primary context that the
/// CUDA runtime and torch use, or any other; natsl never destroys it). Fails with
/// `NATSL_STATUS_NO_DEVICE` without a driver, device or current context.
#[no_mangle]
pub unsafe extern "C" fn natsl_runtime_create(out: *mut *mut NatslRuntime) -> NatslStatus {
    let _keep = KeepCurrentContext::new();
    guard(|| {
        let out = nonnull_mut(out, "out")?;
        *out = std::ptr::null_mut();
        // The legacy stream as the base: every launching call names its stream.
        let rt = Runtime::from_raw_stream(std::ptr::null_mut())?;
        *out = Box::into_raw(Box::new(NatslRuntime { rt }));
        Ok(())
    })
}

/// Destroy a runtime (null is ignored). Work it queued is not waited for.
#[no_mangle]
pub unsafe extern "C" fn natsl_runtime_destroy(rt: *mut NatslRuntime) -> NatslStatus {
    let _keep = KeepCurrentContext::new();
    guard(|| {
        if !rt.is_null() {
            drop(Box::from_raw(rt));
        }
        Ok(())
    })
}

/// Code path (80 or 90 for sm_90a) and SM count of a runtime's device.
#[no_mangle]
pub unsafe extern "C" fn natsl_runtime_info(rt: *const NatslRuntime, arch: *mut i32, sm_count: *mut i32) -> NatslStatus {
    guard(|| {
        let rt = nonnull(rt, "rt")?;
        *nonnull_mut(arch, "arch")? = if rt.rt.arch() == natsl::Arch::Sm90a { 90 } else { 80 };
        *nonnull_mut(sm_count, "sm_count")? = rt.rt.sm_count() as i32;
        Ok(())
    })
}

/// The device fault bits (`NATSL_FAULT_*`) the kernels recorded since the last call:
/// device-resident indices, labels or page data out of range, sparse-prefill list entries
/// repeated or out of order, each treated as its bit documents. Reads and clears the
/// device's word; waits for the runtime's stream (not for use inside graph capture).
///
/// # Safety
/// `rt` is a live runtime handle and `faults` a writable `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn natsl_device_faults(rt: *const NatslRuntime, faults: *mut u32) -> NatslStatus {
    guard(|| {
        let rt = nonnull(rt, "rt")?;
        *nonnull_mut(faults, "faults")? = rt.rt.device_faults()?.0;
        Ok(())
    })
}

/// Load or compile every unit `model` uses, on all cores; `progress` (nullable) is
/// called once per unit from natsl's threads, serialised. Calls of other threads
/// that need units already loaded go on meanwhile.
#[no_mangle]
pub unsafe extern "C" fn natsl_runtime_warmup(rt: *const NatslRuntime, model: *const NatslModel, progress: NatslProgressFn, user: *mut c_void) -> NatslStatus {
    let _keep = KeepCurrentContext::new();
    guard(|| {
        let rt = nonnull(rt, "rt")?;
        let m = nonnull(model, "model")?;
        let dtype = dtype_of(m.dtype, "model")?.activation().ok_or_else(|| Error::invalid("model", "dtype must be bf16 or f16"))?;
        let pair = |a: i32, b: i32| (a > 0 && b > 0).then_some((a as u32, b as u32));
        let router = match m.router {
            0 => None,
            1 => Some(natsl::ops::router::RouterPolicy::Argmax),
            2 => Some(natsl::ops::router::RouterPolicy::KeepFraction(0.5)),
            r => return Err(Error::invalid("model", format!("router {r} is not a NatslRouter"))),
        };
        let mk = ModelKernels { dtype, gdn: pair(m.gdn_dk, m.gdn_dv), sparse: pair(m.sparse_dk, m.sparse_dv), router };
        let specs = mk.specs(rt.rt.arch());
        struct User(*mut c_void);
        // SAFETY: the header makes the callback and its user data callable from natsl's threads.
        unsafe impl Send for User {}
        let user = User(user);
        rt.rt.warmup_with(&specs, move |p| {
            let user = &user;
            if let Some(cb) = progress {
                let name = CString::new(p.unit).unwrap_or_default();
                let st = p.error.map_or(NatslStatus::Ok, status_of);
                cb(p.done as u64, p.total as u64, name.as_ptr(), p.seconds, st, user.0);
            }
        })
    })
}

/// A batch from host `cu_seqlens` (`len` = N + 1 entries). `cu_seqlens_device`: the
/// caller's device copy of the same values (used in place; must outlive the batch),
/// or 0 to have natsl upload one on `stream`.
#[no_mangle]
pub unsafe extern "C" fn natsl_batch_create(rt: *const NatslRuntime, cu_seqlens: *const i32, len: i64, cu_seqlens_device: u64, stream: *mut c_void, out: *mut *mut NatslBatch) -> NatslStatus {
    let _keep = KeepCurrentContext::new();
    guard(|| {
        let out = nonnull_mut(out, "out")?;
        *out = std::ptr::null_mut();
        let rt = nonnull(rt, "rt")?;
        let cu = host_slice(cu_seqlens, len, "cu_seqlens")?;
        let batch = if cu_seqlens_device != 0 { Batch::from_device(cu, cu_seqlens_device)? } else { Batch::new(&on(rt, stream)?, cu)? };
        *out = Box::into_raw(Box::new(NatslBatch { batch }));
        Ok(())
    })
}

/// Destroy a batch (null is ignored). Destroy it only after the work that uses it.
#[no_mangle]
pub unsafe extern "C" fn natsl_batch_destroy(batch: *mut NatslBatch) -> NatslStatus {
    let _keep = KeepCurrentContext::new();
    guard(|| {
        if !batch.is_null() {
            drop(Box::from_raw(batch));
        }
        Ok(())
    })
}

/// A workspace natsl allocates (zeroed) and grows on the stream of the call that
/// needs more; freed on destroy, which must come before that stream is destroyed.
#[no_mangle]
pub unsafe extern "C" fn natsl_workspace_create(out: *mut *mut NatslWorkspace) -> NatslStatus {
    guard(|| {
        *nonnull_mut(out, "out")? = Box::into_raw(Box::new(NatslWorkspace { scratch: Scratch::new() }));
        Ok(())
    })
}

/// A workspace over the caller's device memory (256-byte aligned, `bytes` long; for
/// a GDN decode zeroed once before the first step). natsl never allocates in it,
/// never frees it; a call that needs more fails with `NATSL_STATUS_INVALID_ARGUMENT`.
#[no_mangle]
pub unsafe extern "C" fn natsl_workspace_create_from(ptr: u64, bytes: u64, out: *mut *mut NatslWorkspace) -> NatslStatus {
    guard(|| {
        let out = nonnull_mut(out, "out")?;
        if ptr == 0 || ptr as usize % natsl::workspace::WORKSPACE_ALIGN != 0 {
            return Err(Error::invalid("ptr", format!("{ptr:#x} is not a {}-byte aligned device pointer", natsl::workspace::WORKSPACE_ALIGN)));
        }
        *out = Box::into_raw(Box::new(NatslWorkspace { scratch: Scratch::from_raw(ptr, bytes as usize) }));
        Ok(())
    })
}

/// Destroy a workspace (null is ignored): frees natsl's own memory (stream-ordered).
#[no_mangle]
pub unsafe extern "C" fn natsl_workspace_destroy(ws: *mut NatslWorkspace) -> NatslStatus {
    let _keep = KeepCurrentContext::new();
    guard(|| {
        if !ws.is_null() {
            drop(Box::from_raw(ws));
        }
        Ok(())
    })
}

/// Check a GDN prefill call on the host only (no device, no runtime needed).
#[no_mangle]
pub unsafe extern "C" fn natsl_gdn_prefill_validate(cu_seqlens: *const i32, len: i64, args: *const NatslGdnPrefillArgs) -> NatslStatus {
    guard(|| {
        let cu = host_slice(cu_seqlens, len, "cu_seqlens")?;
        let (i, o, opts) = gdn_prefill_views(nonnull(args, "args")?)?;
        gdn::validate_prefill(cu, &i, &o, &opts).map(|_| ())
    })
}

/// Workspace bytes a [`natsl_gdn_prefill`] call with these arguments needs.
#[no_mangle]
pub unsafe extern "C" fn natsl_gdn_prefill_workspace_bytes(rt: *const NatslRuntime, batch: *const NatslBatch, args: *const NatslGdnPrefillArgs, bytes: *mut u64) -> NatslStatus {
    guard(|| {
        let rt = nonnull(rt, "rt")?;
        let b = nonnull(batch, "batch")?;
        let (i, o, opts) = gdn_prefill_views(nonnull(args, "args")?)?;
        *nonnull_mut(bytes, "bytes")? = gdn::prefill_workspace_bytes(&rt.rt, b.batch.cu_seqlens(), &i, &o, &opts)? as u64;
        Ok(())
    })
}

/// GDN prefill on `stream`.
#[no_mangle]
pub unsafe extern "C" fn natsl_gdn_prefill(rt: *const NatslRuntime, batch: *const NatslBatch, args: *const NatslGdnPrefillArgs, ws: *mut NatslWorkspace, stream: *mut c_void) -> NatslStatus {
    let _keep = KeepCurrentContext::new();
    guard(|| {
        let rt = on(nonnull(rt, "rt")?, stream)?;
        let b = nonnull(batch, "batch")?;
        let ws = nonnull_mut(ws, "ws")?;
        let (i, mut o, opts) = gdn_prefill_views(nonnull(args, "args")?)?;
        let mut w = gdn::GdnWorkspace::from_scratch(std::mem::take(&mut ws.scratch));
        let r = gdn::gdn_prefill(&rt, &b.batch, &i, &mut o, &opts, &mut w);
        ws.scratch = w.scratch;
        r
    })
}

/// # Safety
/// Descriptors as in the header.
unsafe fn gdn_decode_views<'a>(a: &NatslGdnDecodeArgs) -> Result<(gdn::GdnDecodeInputs<'a>, TensorMut<'a>, gdn::GdnDecodeState<'a>, gdn::GdnOptions), Error> {
    let inp = gdn::GdnDecodeInputs {
        q: view(&a.q, "q")?,
        k: view(&a.k, "k")?,
        v: view(&a.v, "v")?,
        g: view(&a.g, "g")?,
        beta: view(&a.beta, "beta")?,
        labels: opt(&a.labels, "labels")?,
        tokens_per_seq: a.tokens_per_seq.max(0) as usize,
    };
    let committed = match opt_mut(&a.committed, "committed")? {
        Some(p) => Some((p, view(&a.committed_index, "committed_index")?)),
        None => None,
    };
    let st = gdn::GdnDecodeState { running: view_mut(&a.running, "running")?, running_index: view(&a.running_index, "running_index")?, committed, gsum: opt_mut(&a.gsum, "gsum")?, pos: opt_mut(&a.pos, "pos")? };
    Ok((inp, view_mut(&a.o, "o")?, st, gdn::GdnOptions { scale: scale_of(a.scale), l2norm: a.l2norm != 0 }))
}

/// One GDN decode step on `stream` (no host synchronisation; allocates only when
/// natsl's own workspace must grow: reserve with a first call before a capture).
#[no_mangle]
pub unsafe extern "C" fn natsl_gdn_decode(rt: *const NatslRuntime, args: *const NatslGdnDecodeArgs, ws: *mut NatslWorkspace, stream: *mut c_void) -> NatslStatus {
    let _keep = KeepCurrentContext::new();
    guard(|| {
        let rt = on(nonnull(rt, "rt")?, stream)?;
        let ws = nonnull_mut(ws, "ws")?;
        let (i, mut o, mut st, opts) = gdn_decode_views(nonnull(args, "args")?)?;
        let mut w = gdn::GdnDecodeWorkspace::from_scratch(std::mem::take(&mut ws.scratch));
        let r = gdn::gdn_decode(&rt, &i, &mut o, &mut st, &opts, &mut w);
        ws.scratch = w.scratch;
        r
    })
}

/// Workspace bytes of a GDN decode step of `num_seqs` sequences.
#[no_mangle]
pub extern "C" fn natsl_gdn_decode_workspace_bytes(num_seqs: u64) -> u64 {
    gdn::decode_workspace_bytes(num_seqs as usize) as u64
}

/// Check a sparse prefill call on the host only (no device, no runtime needed).
#[no_mangle]
pub unsafe extern "C" fn natsl_sparse_prefill_validate(cu_seqlens: *const i32, len: i64, args: *const NatslSparsePrefillArgs) -> NatslStatus {
    guard(|| {
        let cu = host_slice(cu_seqlens, len, "cu_seqlens")?;
        let a = nonnull(args, "args")?;
        let (q, k, v, mask, opts) = sparse_prefill_views(a)?;
        let o = view(&a.o, "o")?;
        let lse = opt(&a.lse, "lse")?;
        sparse::validate_prefill(cu, &q, &k, &v, &mask, &opts, &o, lse.as_ref()).map(|_| ())
    })
}

/// Block-sparse prefill on `stream` (needs no workspace).
#[no_mangle]
pub unsafe extern "C" fn natsl_sparse_prefill(rt: *const NatslRuntime, batch: *const NatslBatch, args: *const NatslSparsePrefillArgs, stream: *mut c_void) -> NatslStatus {
    let _keep = KeepCurrentContext::new();
    guard(|| {
        let rt = on(nonnull(rt, "rt")?, stream)?;
        let b = nonnull(batch, "batch")?;
        let a = nonnull(args, "args")?;
        let (q, k, v, mask, opts) = sparse_prefill_views(a)?;
        let mut o = view_mut(&a.o, "o")?;
        let mut lse = opt_mut(&a.lse, "lse")?;
        sparse::prefill(&rt, &b.batch, &q, &k, &v, &mask, &opts, &mut o, lse.as_mut())
    })
}

/// # Safety
/// Descriptors as in the header.
unsafe fn sparse_decode_views<'a>(a: &NatslSparseDecodeArgs) -> Result<(TensorRef<'a>, sparse::PagedKv<'a>, sparse::SparseOptions<'a>), Error> {
    let kv = sparse::PagedKv {
        k_pages: view(&a.k_pages, "k_pages")?,
        v_pages: view(&a.v_pages, "v_pages")?,
        page_table: view(&a.page_table, "page_table")?,
        page_count: view(&a.page_count, "page_count")?,
        cur_page: view(&a.cur_page, "cur_page")?,
        cur_len: view(&a.cur_len, "cur_len")?,
    };
    let splits = match a.num_splits {
        0 => None,
        s if s > 0 => Some(s as usize),
        s => return Err(Error::invalid("num_splits", format!("{s} (0 = automatic, or at least 1)"))),
    };
    let opts = sparse::SparseOptions { scale: scale_of(a.scale), q_norm_w: opt(&a.q_norm_w, "q_norm_w")?, k_norm_w: opt(&a.k_norm_w, "k_norm_w")?, num_splits: splits, ..Default::default() };
    Ok((view(&a.q, "q")?, kv, opts))
}

/// Workspace bytes of a sparse decode call on `rt`'s device.
#[no_mangle]
pub unsafe extern "C" fn natsl_sparse_decode_workspace_bytes(rt: *const NatslRuntime, args: *const NatslSparseDecodeArgs, bytes: *mut u64) -> NatslStatus {
    guard(|| {
        let rt = nonnull(rt, "rt")?;
        let a = nonnull(args, "args")?;
        let (q, kv, opts) = sparse_decode_views(a)?;
        let o = view(&a.o, "o")?;
        let lse = opt(&a.lse, "lse")?;
        let plan = sparse::validate_decode(&q, a.num_queries.max(0) as usize, &kv, &opts, &o, lse.as_ref())?;
        *nonnull_mut(bytes, "bytes")? = sparse::decode_workspace_bytes(&plan, rt.rt.sm_count(), opts.num_splits) as u64;
        Ok(())
    })
}

/// Paged sparse decode on `stream`.
#[no_mangle]
pub unsafe extern "C" fn natsl_sparse_decode(rt: *const NatslRuntime, args: *const NatslSparseDecodeArgs, ws: *mut NatslWorkspace, stream: *mut c_void) -> NatslStatus {
    let _keep = KeepCurrentContext::new();
    guard(|| {
        let rt = on(nonnull(rt, "rt")?, stream)?;
        let ws = nonnull_mut(ws, "ws")?;
        let a = nonnull(args, "args")?;
        let (q, kv, opts) = sparse_decode_views(a)?;
        let mut o = view_mut(&a.o, "o")?;
        let mut lse = opt_mut(&a.lse, "lse")?;
        let mut w = sparse::DecodeWorkspace::from_scratch(std::mem::take(&mut ws.scratch));
        let r = sparse::decode(&rt, &q, a.num_queries.max(0) as usize, &kv, &opts, &mut o, lse.as_mut(), &mut w);
        ws.scratch = w.scratch;
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let st = guard(|| panic!("boom"));
        assert_eq!(st, NatslStatus::Panic);
        // SAFETY: the thread-local message is a NUL-terminated string.
        let msg = unsafe { std::ffi::CStr::from_ptr(natsl_last_error()) }.to_string_lossy().into_owned();
        assert!(msg.contains("boom"), "{msg}");
        assert_eq!(guard(|| Err(Error::invalid("q", "bad"))), NatslStatus::InvalidArgument);
        assert_eq!(guard(|| Ok(())), NatslStatus::Ok);
    }
}

/// Check a merge call on the host only (no device, no runtime needed).
#[no_mangle]
pub unsafe extern "C" fn natsl_merge_validate(args: *const NatslMergeArgs) -> NatslStatus {
    guard(|| {
        let a = nonnull(args, "args")?;
        let inp = merge_views(a)?;
        let out = view(&a.out, "out")?;
        merge::validate(&inp, &out).map(|_| ())
    })
}

/// The merge epilogue on `stream` (one launch, no workspace).
#[no_mangle]
pub unsafe extern "C" fn natsl_merge(rt: *const NatslRuntime, args: *const NatslMergeArgs, stream: *mut c_void) -> NatslStatus {
    let _keep = KeepCurrentContext::new();
    guard(|| {
        let rt = on(nonnull(rt, "rt")?, stream)?;
        let a = nonnull(args, "args")?;
        let inp = merge_views(a)?;
        let mut out = view_mut(&a.out, "out")?;
        merge::merge(&rt, &inp, &mut out)
    })
}
