//! Device scratch memory of an op: natsl's own (grown on demand) or the caller's
//! (fixed: a call that needs more fails with `InvalidArgument { arg: "workspace" }`
//! and allocates nothing). Each op's `*_workspace_bytes` says how much a call needs.

use crate::error::{Error, Result};
use crate::runtime::Runtime;
use cudarc::driver::{CudaSlice, DevicePtrMut};

/// Alignment natsl needs of a caller's workspace (every region inside is 256-byte aligned).
pub const WORKSPACE_ALIGN: usize = 256;

#[derive(Debug, Default)]
enum Mem {
    #[default]
    Empty,
    /// Allocated by natsl on the runtime's stream; grows.
    Owned(CudaSlice<u8>),
    /// The caller's cudarc allocation, moved in; never grows.
    Given(CudaSlice<u8>),
    /// The caller's raw device memory; never grows, never freed by natsl.
    Raw { ptr: u64, bytes: usize },
}

/// Scratch device memory, reusable across calls of one op.
///
/// A scratch is used by one stream at a time: calls on different streams that
/// share one must be ordered by the caller.
#[derive(Debug, Default)]
pub struct Scratch {
    mem: Mem,
}

impl Scratch {
    /// Empty: natsl allocates on first use and grows as needed.
    pub fn new() -> Self {
        Self::default()
    }
    /// The caller's allocation (moved in; [`Scratch::into_slice`] gives it back).
    pub fn from_slice(buf: CudaSlice<u8>) -> Self {
        Scratch { mem: Mem::Given(buf) }
    }
    /// The caller's raw device memory of `bytes` bytes.
    ///
    /// # Safety
    /// `ptr` must be device memory of the runtime's context, [`WORKSPACE_ALIGN`]-byte
    /// aligned, at least `bytes` long, not used by anything else while calls that
    /// use this scratch may run (including queued work), and outlive those calls.
    pub unsafe fn from_raw(ptr: u64, bytes: usize) -> Self {
        Scratch { mem: Mem::Raw { ptr, bytes } }
    }
    /// Bytes available now.
    pub fn bytes(&self) -> usize {
        match &self.mem {
            Mem::Empty => 0,
            Mem::Owned(b) | Mem::Given(b) => b.len(),
            Mem::Raw { bytes, .. } => *bytes,
        }
    }
    /// Whether natsl may allocate (it never does for the caller's memory).
    pub fn grows(&self) -> bool {
        matches!(self.mem, Mem::Empty | Mem::Owned(_))
    }
    /// The cudarc buffer (natsl's or the caller's), if any.
    pub fn into_slice(self) -> Option<CudaSlice<u8>> {
        match self.mem {
            Mem::Owned(b) | Mem::Given(b) => Some(b),
            _ => None,
        }
    }
    /// Allocate now (natsl's own memory), so that later calls needing at most
    /// `bytes` allocate nothing (e.g. before a CUDA graph capture).
    pub fn reserve(&mut self, rt: &Runtime, bytes: usize) -> Result<()> {
        self.ptr(rt, bytes).map(|_| ())
    }

    /// A device pointer to at least `need` bytes (natsl's allocations start zeroed).
    pub(crate) fn ptr(&mut self, rt: &Runtime, need: usize) -> Result<u64> {
        // A cudarc buffer (natsl's or the caller's) must be memory of the launching runtime.
        if let Mem::Owned(b) | Mem::Given(b) = &self.mem {
            let (c, r) = (crate::tensor::ContextId::of(b.context()), rt.context_id());
            if c != r {
                return Err(Error::invalid("workspace", format!("was allocated in {c}, not in the runtime's {r}")));
            }
        }
        if need > self.bytes() {
            if !self.grows() {
                return Err(Error::invalid("workspace", format!("the caller's workspace holds {} bytes, this call needs {need}", self.bytes())));
            }
            self.mem = Mem::Owned(rt.stream().alloc_zeros::<u8>(need.max(1))?);
        }
        let s = rt.stream();
        Ok(match &mut self.mem {
            Mem::Empty => 0,
            // The guard only records cudarc's events; natsl orders scratch by its stream.
            Mem::Owned(b) | Mem::Given(b) => b.device_ptr_mut(s).0,
            Mem::Raw { ptr, .. } => {
                if *ptr as usize % WORKSPACE_ALIGN != 0 {
                    return Err(Error::invalid("workspace", format!("device pointer {ptr:#x} is not {WORKSPACE_ALIGN}-byte aligned")));
                }
                *ptr
            }
        })
    }
}

/// Round up to [`WORKSPACE_ALIGN`].
pub(crate) fn align(x: usize) -> usize {
    x.div_ceil(WORKSPACE_ALIGN).saturating_mul(WORKSPACE_ALIGN)
}
