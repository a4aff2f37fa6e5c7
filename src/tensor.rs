//! Device tensor views and their validation. Every op validates its tensors
//! through these helpers, so a shape rule lives in one place: per view
//! ([`TensorRef::check_layout`] and friends) and per call ([`Operands`]: aliasing
//! and the CUDA context).

use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr};
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

/// The CUDA context a view's memory belongs to. Views made from cudarc slices know
/// theirs; every op compares it with its runtime's before launching.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContextId {
    pub(crate) ctx: usize,
    pub(crate) ordinal: usize,
}

impl ContextId {
    pub fn of(ctx: &CudaContext) -> ContextId {
        ContextId { ctx: ctx.cu_ctx() as usize, ordinal: ctx.ordinal() }
    }
}

impl std::fmt::Display for ContextId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "context {:#x} of device {}", self.ctx, self.ordinal)
    }
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
    /// `None` for raw views (the caller vouches for the context, see `from_raw`).
    ctx: Option<ContextId>,
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
        let ctx = Some(ContextId::of(s.stream().context()));
        TensorRef { ptr: ptr_of(s), avail: s.len(), dtype: T::DTYPE, shape: shape.to_vec(), strides: strides.to_vec(), ctx, _borrow: PhantomData }
    }
    /// A view of raw device memory.
    ///
    /// # Safety
    /// `ptr` must be a device allocation of the runtime's context holding at least
    /// `avail` elements of `dtype`, valid and not written by others for `'a`.
    /// (Shapes, strides, bounds and aliasing are still validated; the context cannot be.)
    pub unsafe fn from_raw(ptr: u64, avail: usize, dtype: DType, shape: &[usize], strides: &[usize]) -> Self {
        TensorRef { ptr, avail, dtype, shape: shape.to_vec(), strides: strides.to_vec(), ctx: None, _borrow: PhantomData }
    }
    /// The CUDA context of the memory (`None` for raw views).
    pub fn context(&self) -> Option<ContextId> {
        self.ctx
    }
    pub(crate) fn set_context(&mut self, ctx: Option<ContextId>) {
        self.ctx = ctx;
    }
    /// Elements addressable from `ptr` (what bounds are checked against).
    pub fn avail(&self) -> usize {
        self.avail
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
    /// Element count, saturating at `usize::MAX` (see [`TensorRef::checked_numel`]).
    pub fn numel(&self) -> usize {
        self.checked_numel().unwrap_or(usize::MAX)
    }
    pub fn checked_numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |a, &s| a.checked_mul(s))
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
        if self.strides.len() != self.shape.len() {
            return Err(Error::invalid(arg, format!("{} strides for {} dims (shape {:?}, strides {:?})", self.strides.len(), self.shape.len(), self.shape, self.strides)));
        }
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
        // Byte offsets are what the kernels compute: they must fit, as must the end address.
        let end = (max_off as u128 + 1) * es as u128 + self.ptr as u128;
        if end > u64::MAX as u128 || self.strides.iter().any(|st| st.checked_mul(es).is_none_or(|b| b > i64::MAX as usize)) {
            return Err(Error::invalid(arg, format!("strides {:?} overflow the address space", self.strides)));
        }
        if align_bytes == 0 || !self.ptr.is_multiple_of(align_bytes as u64) {
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
        let ctx = Some(ContextId::of(stream.context()));
        let (p, _guard) = s.device_ptr_mut(&stream);
        TensorMut { inner: TensorRef { ptr: p, avail, dtype: T::DTYPE, shape: shape.to_vec(), strides: strides.to_vec(), ctx, _borrow: PhantomData } }
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
    pub(crate) fn set_context(&mut self, ctx: Option<ContextId>) {
        self.inner.ctx = ctx;
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

// ---- per-call checks: aliasing and the CUDA context ----

/// How an op uses a view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Only read: may overlap other reads.
    Read,
    /// Written (or updated in place): must not overlap itself or any other view of the call.
    Write,
}

/// Bytes `[lo + i * pitch, lo + i * pitch + span)` for `i < count` (`span <= pitch`
/// when `count > 1`): a view's footprint, or one pool row (`seq` its sequence).
#[derive(Clone, Copy, Debug)]
struct Block {
    lo: u128,
    pitch: u128,
    span: u128,
    count: u128,
    seq: u32,
}

const NO_SEQ: u32 = u32::MAX;

impl Block {
    fn hi(&self) -> u128 {
        // Saturating: views reach here validated, but the checks must not panic on any input.
        self.lo.saturating_add((self.count - 1).saturating_mul(self.pitch)).saturating_add(self.span)
    }
    /// Exact for one-row blocks and for blocks of one pitch; otherwise conservative
    /// (bounding ranges that meet count as an overlap).
    fn overlaps(&self, o: &Block) -> bool {
        if self.hi() <= o.lo || o.hi() <= self.lo {
            return false;
        }
        let (a, b) = if self.count <= o.count { (self, o) } else { (o, self) };
        if a.count == 1 {
            if b.count == 1 {
                return true;
            }
            // The first row of b that ends after a starts, if it starts before a ends.
            let b_end0 = b.lo.saturating_add(b.span);
            let i = if a.lo + 1 > b_end0 { (a.lo + 1 - b_end0).div_ceil(b.pitch.max(1)) } else { 0 };
            return i < b.count && b.lo.saturating_add(i.saturating_mul(b.pitch)) < a.lo.saturating_add(a.span);
        }
        if a.pitch == b.pitch {
            // Same row pitch (e.g. column slices of one packed projection): disjoint
            // column ranges modulo the pitch never meet.
            let p = a.pitch.max(1);
            let d = (b.lo % p + p - a.lo % p) % p;
            return d < a.span || d.saturating_add(b.span) > p;
        }
        true
    }
}

/// The (extent, stride) pairs of `v`'s dims with extent > 1 (and, if `moving`, a
/// nonzero stride), on the stack: these checks run on every decode step.
fn dims_of(v: &TensorRef, moving: bool) -> Option<([(u128, u128); 8], usize)> {
    let mut d = [(0u128, 0u128); 8];
    let mut n = 0;
    for (&s, &st) in v.shape.iter().zip(&v.strides) {
        if s > 1 && (!moving || st > 0) {
            *d.get_mut(n)? = (s as u128, st as u128);
            n += 1;
        }
    }
    Some((d, n))
}

/// Footprint of a validated view (`check_layout` passed: ranks match, offsets fit).
fn footprint(v: &TensorRef) -> Block {
    let es = v.dtype.size() as u128;
    let Some((d, n)) = dims_of(v, true) else {
        // More than 8 moving dims (no op takes those): all of the address space from ptr.
        return Block { lo: v.ptr as u128, pitch: u128::MAX, span: u128::MAX, count: 1, seq: NO_SEQ };
    };
    let dims = &d[..n];
    let max_off: u128 = dims.iter().fold(0u128, |m, (s, st)| m.saturating_add((s - 1).saturating_mul(*st)));
    let bytes = max_off.saturating_add(1).saturating_mul(es);
    let whole = Block { lo: v.ptr as u128, pitch: bytes, span: bytes, count: 1, seq: NO_SEQ };
    let Some(&(rows, pitch)) = dims.iter().max_by_key(|(_, st)| *st) else { return whole };
    let inner = max_off.saturating_sub((rows - 1).saturating_mul(pitch));
    if inner >= pitch || bytes == u128::MAX {
        return whole;
    }
    Block { lo: v.ptr as u128, pitch: pitch.saturating_mul(es), span: (inner + 1).saturating_mul(es), count: rows, seq: NO_SEQ }
}

/// Whether two elements of `v` share an address (a zero stride, or strides that
/// interleave): sorted by stride, each stride must pass the largest offset of the
/// smaller ones.
fn self_overlapping(v: &TensorRef) -> bool {
    let Some((mut d, n)) = dims_of(v, false) else { return true };
    let dims = &mut d[..n];
    dims.sort_unstable_by_key(|&(_, st)| st);
    let mut reach = 0u128;
    for &(s, st) in dims.iter() {
        if st <= reach || st == 0 {
            return true;
        }
        reach = reach.saturating_add((s - 1).saturating_mul(st));
    }
    false
}

/// One block (a view) or one per sequence (pool rows), without a heap
/// allocation for the common case.
#[derive(Clone, Debug)]
enum Blocks {
    One(Block),
    Rows(Vec<Block>),
}

impl Blocks {
    fn as_slice(&self) -> &[Block] {
        match self {
            Blocks::One(b) => std::slice::from_ref(b),
            Blocks::Rows(v) => v,
        }
    }
}

#[derive(Clone, Debug)]
struct Operand {
    arg: &'static str,
    access: Access,
    ctx: Option<ContextId>,
    /// One block for a view; one per sequence (sorted by address) for indexed pool rows.
    blocks: Blocks,
    rows: bool,
    /// A written view whose elements share addresses.
    self_overlap: bool,
}

/// The views of one call and how the op uses them, for the rules that look at
/// several views at once (SPEC.md section 2):
/// - no written view overlaps itself (a zero or interleaving stride: two threads,
///   one address) or any other view of the call, except where the op allows a pair
///   in place ([`Operands::allow_in_place`]);
/// - every view is memory of the runtime's CUDA context (or, without a runtime, of
///   one context).
///
/// Each check names the argument: the written one of an overlapping pair (the later
/// one where both are written).
#[derive(Clone, Debug, Default)]
pub struct Operands {
    list: Vec<Operand>,
    in_place: Vec<(&'static str, &'static str)>,
}

impl Operands {
    pub fn new() -> Self {
        Operands { list: Vec::with_capacity(16), in_place: Vec::new() }
    }
    /// A view the op only reads. Call after its own checks (`check_layout`).
    pub fn read(&mut self, arg: &'static str, v: &TensorRef) -> &mut Self {
        self.push(arg, Access::Read, v)
    }
    /// A view the op writes (or updates in place).
    pub fn write(&mut self, arg: &'static str, v: &TensorRef) -> &mut Self {
        self.push(arg, Access::Write, v)
    }
    fn push(&mut self, arg: &'static str, access: Access, v: &TensorRef) -> &mut Self {
        let self_overlap = access == Access::Write && self_overlapping(v);
        self.list.push(Operand { arg, access, ctx: v.ctx, blocks: Blocks::One(footprint(v)), rows: false, self_overlap });
        self
    }
    /// The rows of a state pool `[P, ...]` (contiguous, validated) that a call touches:
    /// row `index[n]` (or `n` without an index) for each of `n_seqs` sequences.
    pub fn pool_rows(&mut self, arg: &'static str, access: Access, pool: &TensorRef, index: Option<&[i32]>, n_seqs: usize) -> &mut Self {
        let es = pool.dtype.size() as u128;
        let row = pool.strides.first().copied().unwrap_or(1) as u128 * es;
        let mut blocks: Vec<Block> = (0..n_seqs)
            .map(|n| {
                let r = index.and_then(|ix| ix.get(n)).map_or(n as u128, |&r| r.max(0) as u128);
                Block { lo: (pool.ptr as u128).saturating_add(r.saturating_mul(row)), pitch: row, span: row, count: 1, seq: n as u32 }
            })
            .collect();
        blocks.sort_by_key(|b| b.lo);
        self.list.push(Operand { arg, access, ctx: pool.ctx, blocks: Blocks::Rows(blocks), rows: true, self_overlap: false });
        self
    }
    /// A whole state pool behind a device index (its rows are unknown on the host).
    /// Two such pools allowed in place ([`Operands::allow_in_place`]) may be the same
    /// pool: the engine's single state pool, read and written through the same slots.
    pub fn whole_pool(&mut self, arg: &'static str, access: Access, pool: &TensorRef) -> &mut Self {
        self.list.push(Operand { arg, access, ctx: pool.ctx, blocks: Blocks::One(footprint(pool)), rows: true, self_overlap: false });
        self
    }
    /// Pool rows `a` and `b` may be the same rows when they serve the same sequence
    /// (an in-place update: the op reads that row before it writes it).
    pub fn allow_in_place(&mut self, a: &'static str, b: &'static str) -> &mut Self {
        self.in_place.push((a, b));
        self
    }

    /// Run the checks; `runtime` is the context of the runtime that will launch
    /// (`None`: only that the views share one context).
    pub fn check(&self, runtime: Option<ContextId>) -> Result<()> {
        let mut want = runtime;
        for o in &self.list {
            match (o.ctx, want) {
                (Some(c), Some(w)) if c != w => {
                    let whose = if runtime.is_some() { "the runtime's" } else { "the other tensors'" };
                    return Err(Error::invalid(o.arg, format!("is memory of {c}, not of {whose} ({w})")));
                }
                (Some(c), None) => want = Some(c),
                _ => {}
            }
        }
        for (i, a) in self.list.iter().enumerate() {
            if a.self_overlap {
                return Err(Error::invalid(a.arg, "overlaps itself: a zero or interleaving stride makes two elements share an address, and two threads would write it"));
            }
            if a.rows && a.access == Access::Write {
                if let Some(w) = a.blocks.as_slice().windows(2).find(|w| w[0].overlaps(&w[1])) {
                    return Err(Error::invalid(a.arg, format!("sequences {} and {} write one row", w[0].seq, w[1].seq)));
                }
            }
            for b in &self.list[..i] {
                if a.access == Access::Read && b.access == Access::Read {
                    continue;
                }
                let in_place = a.rows && b.rows && self.in_place.iter().any(|&(x, y)| (x, y) == (a.arg, b.arg) || (y, x) == (a.arg, b.arg));
                if let Some((x, y)) = first_overlap(a.blocks.as_slice(), b.blocks.as_slice(), in_place) {
                    let (named, other, here, there) = if a.access == Access::Write { (a, b, x, y) } else { (b, a, y, x) };
                    let what = if here.seq != NO_SEQ && there.seq != NO_SEQ {
                        format!(" (the row of sequence {} here is a row of sequence {} there)", here.seq, there.seq)
                    } else {
                        String::new()
                    };
                    return Err(Error::invalid(named.arg, format!("overlaps `{}`{what}: an output may not alias another tensor of the call", other.arg)));
                }
            }
        }
        Ok(())
    }
}

/// The first pair of overlapping blocks (`in_place`: identical rows of one sequence
/// are allowed). Row lists are sorted with equal spans, so each row meets a short run.
fn first_overlap(a: &[Block], b: &[Block], in_place: bool) -> Option<(Block, Block)> {
    let allowed = |x: &Block, y: &Block| in_place && x.seq == y.seq && x.lo == y.lo && x.span == y.span;
    if a.is_empty() || b.is_empty() {
        return None;
    }
    if a.len() == 1 || b.len() == 1 {
        let (one, many) = if a.len() == 1 { (&a[0], b) } else { (&b[0], a) };
        return many.iter().find(|m| m.overlaps(one) && !allowed(m, one)).map(|m| (*one, *m));
    }
    let span_b = b.iter().map(|x| x.span).max().unwrap_or(0);
    for x in a {
        // Rows of b that start in (x.lo - span_b, x.hi).
        let start = b.partition_point(|y| y.lo.saturating_add(span_b) <= x.lo);
        for y in b[start..].iter().take_while(|y| y.lo < x.hi()) {
            if x.overlaps(y) && !allowed(x, y) {
                return Some((*x, *y));
            }
        }
    }
    None
}
