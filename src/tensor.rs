//! Device tensor views and their validation. Every op validates its tensors
//! through these helpers, so a shape rule lives in one place.

use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr};
use std::marker::PhantomData;

/// Element type of a device tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    Bf16,
    F16,
    F32,
    I32,
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::U8 => 1,
        }
    }
    /// The activation dtype a kernel is specialised for.
    pub fn activation(self) -> Option<natsl_codegen::DType> {
        match self {
            DType::Bf16 => Some(natsl_codegen::DType::Bf16),
            DType::F16 => Some(natsl_codegen::DType::F16),
            _ => None,
        }
    }
}

/// Host element types that map to a [`DType`].
pub trait Element: DeviceRepr + Copy + 'static {
    const DTYPE: DType;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::Bf16;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}

/// A read-only view: pointer, shape, element strides and dtype, borrowed from
/// a cudarc slice or view for `'a`.
#[derive(Clone, Debug)]
pub struct TensorRef<'a> {
    ptr: u64,
    /// Elements addressable from `ptr` to the end of the allocation.
    avail: usize,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
    _borrow: PhantomData<&'a ()>,
}

/// A writable view (an output). Same as [`TensorRef`], but built from a mutable borrow.
#[derive(Debug)]
pub struct TensorMut<'a> {
    inner: TensorRef<'a>,
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1].saturating_mul(shape[i + 1]);
    }
    s
}

fn ptr_of<T, S: DevicePtr<T>>(s: &S) -> u64 {
    // The guard records a read event on the slice's stream; natsl launches on the
    // runtime's stream, which callers order with their own work.
    let (p, _guard) = s.device_ptr(s.stream());
    p
}

impl<'a> TensorRef<'a> {
    /// A contiguous view of `shape` over a cudarc slice or view.
    pub fn new<T: Element, S: DevicePtr<T>>(s: &'a S, shape: &[usize]) -> Self {
        Self::strided(s, shape, &contiguous_strides(shape))
    }
    /// A strided view; strides in elements (checked against the allocation at validation).
    pub fn strided<T: Element, S: DevicePtr<T>>(s: &'a S, shape: &[usize], strides: &[usize]) -> Self {
        TensorRef { ptr: ptr_of(s), avail: s.len(), dtype: T::DTYPE, shape: shape.to_vec(), strides: strides.to_vec(), _borrow: PhantomData }
    }
    /// A view of raw device memory.
    ///
    /// # Safety
    /// `ptr` must be a device allocation of the runtime's context holding at least
    /// `avail` elements of `dtype`, valid and not written by others for `'a`.
    pub unsafe fn from_raw(ptr: u64, avail: usize, dtype: DType, shape: &[usize], strides: &[usize]) -> Self {
        TensorRef { ptr, avail, dtype, shape: shape.to_vec(), strides: strides.to_vec(), _borrow: PhantomData }
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn dim(&self, i: usize) -> usize {
        self.shape.get(i).copied().unwrap_or(0)
    }
    pub fn stride(&self, i: usize) -> usize {
        self.strides.get(i).copied().unwrap_or(0)
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    // ---- validation (each names the argument) ----

    /// dtype is one of `allowed`.
    pub fn check_dtype(&self, arg: &'static str, allowed: &[DType]) -> Result<()> {
        if allowed.contains(&self.dtype) {
            Ok(())
        } else {
            Err(Error::invalid(arg, format!("dtype {:?}, expected one of {allowed:?}", self.dtype)))
        }
    }
    /// Rank and extents match (`None` = any extent).
    pub fn check_shape(&self, arg: &'static str, want: &[Option<usize>]) -> Result<()> {
        let ok = self.shape.len() == want.len() && self.strides.len() == want.len() && self.shape.iter().zip(want).all(|(s, w)| w.is_none_or(|w| *s == w));
        if ok {
            Ok(())
        } else {
            let w: Vec<String> = want.iter().map(|w| w.map_or("_".into(), |x| x.to_string())).collect();
            Err(Error::invalid(arg, format!("shape {:?} (strides {:?}), expected [{}]", self.shape, self.strides, w.join(", "))))
        }
    }
    /// Non-empty, last dim contiguous, every element inside the allocation, and
    /// the base pointer and every outer stride aligned to `align_bytes`.
    pub fn check_layout(&self, arg: &'static str, align_bytes: usize) -> Result<()> {
        if self.shape.iter().any(|&s| s == 0) {
            return Err(Error::invalid(arg, format!("empty tensor (shape {:?})", self.shape)));
        }
        if self.strides.last() != Some(&1) && self.shape.last().is_some_and(|&s| s > 1) {
            return Err(Error::invalid(arg, format!("last dimension must be contiguous (strides {:?})", self.strides)));
        }
        let mut max_off: usize = 0;
        for (s, st) in self.shape.iter().zip(&self.strides) {
            max_off = (s - 1).checked_mul(*st).and_then(|x| x.checked_add(max_off)).ok_or_else(|| Error::invalid(arg, "strides overflow"))?;
        }
        if max_off >= self.avail {
            return Err(Error::invalid(arg, format!("shape {:?} with strides {:?} reaches element {max_off}, but the buffer holds {}", self.shape, self.strides, self.avail)));
        }
        let es = self.dtype.size();
        if self.ptr as usize % align_bytes != 0 {
            return Err(Error::invalid(arg, format!("base pointer not aligned to {align_bytes} bytes")));
        }
        for (i, st) in self.strides.iter().enumerate() {
            if i + 1 < self.strides.len() && self.shape[i] > 1 && (st * es) % align_bytes != 0 {
                return Err(Error::invalid(arg, format!("stride {st} of dim {i} is not a multiple of {align_bytes} bytes")));
            }
        }
        Ok(())
    }
    /// Fully contiguous (row-major) layout.
    pub fn check_contiguous(&self, arg: &'static str) -> Result<()> {
        if self.strides == contiguous_strides(&self.shape) {
            Ok(())
        } else {
            Err(Error::invalid(arg, format!("must be contiguous (shape {:?}, strides {:?})", self.shape, self.strides)))
        }
    }
}

impl<'a> TensorMut<'a> {
    /// A contiguous writable view of `shape`.
    pub fn new<T: Element, S: DevicePtrMut<T>>(s: &'a mut S, shape: &[usize]) -> Self {
        Self::strided(s, shape, &contiguous_strides(shape))
    }
    /// A strided writable view.
    pub fn strided<T: Element, S: DevicePtrMut<T>>(s: &'a mut S, shape: &[usize], strides: &[usize]) -> Self {
        let avail = s.len();
        let stream = s.stream().clone();
        let (p, _guard) = s.device_ptr_mut(&stream);
        TensorMut { inner: TensorRef { ptr: p, avail, dtype: T::DTYPE, shape: shape.to_vec(), strides: strides.to_vec(), _borrow: PhantomData } }
    }
    /// # Safety
    /// As [`TensorRef::from_raw`], and nothing else may access the memory for `'a`.
    pub unsafe fn from_raw(ptr: u64, avail: usize, dtype: DType, shape: &[usize], strides: &[usize]) -> Self {
        TensorMut { inner: TensorRef::from_raw(ptr, avail, dtype, shape, strides) }
    }
    /// The read-only view of this output (for validation).
    pub fn view(&self) -> &TensorRef<'a> {
        &self.inner
    }
}

impl<'a> std::ops::Deref for TensorMut<'a> {
    type Target = TensorRef<'a>;
    fn deref(&self) -> &TensorRef<'a> {
        &self.inner
    }
}

/// Anything a view can be made of, for ergonomic entry points.
pub trait AsTensor<T: Element> {
    fn tensor(&self, shape: &[usize]) -> TensorRef<'_>;
}
impl<T: Element> AsTensor<T> for CudaSlice<T> {
    fn tensor(&self, shape: &[usize]) -> TensorRef<'_> {
        TensorRef::new(self, shape)
    }
}
impl<T: Element> AsTensor<T> for CudaView<'_, T> {
    fn tensor(&self, shape: &[usize]) -> TensorRef<'_> {
        TensorRef::new(self, shape)
    }
}
impl<T: Element> AsTensor<T> for CudaViewMut<'_, T> {
    fn tensor(&self, shape: &[usize]) -> TensorRef<'_> {
        TensorRef::new(self, shape)
    }
}
