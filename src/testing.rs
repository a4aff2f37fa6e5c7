//! Helpers shared by the GPU tests, benches and the CLI: device-or-skip,
//! random inputs (never zeros), poisoned outputs, error norms.

use crate::error::Result;
use crate::runtime::Runtime;
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A runtime on device 0, or `None` after printing `skipped: no CUDA device`.
/// With `NATSL_REQUIRE_GPU=1` a missing device is a failure instead.
/// The GPU tests, `cargo bench` and the examples run the heuristics' choices: a tune cache
/// on the machine is not consulted (`natsl bench` and library calls do consult it).
pub fn gpu_or_skip(test: &str) -> Option<Runtime> {
    crate::tune::set_bypass(true);
    match Runtime::new(0) {
        Ok(rt) => Some(rt),
        Err(e) => {
            if std::env::var("NATSL_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("{test}: NATSL_REQUIRE_GPU=1 but {e}");
            }
            // Written to fd 2 directly: the test harness captures println!, and this
            // line must be visible in every run.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: no CUDA device ({test}: {e})");
            None
        }
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform in [-scale, scale], never exactly zero.
pub fn rand_vec(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let x: f64 = rng.gen_range(-1.0..1.0);
            scale * if x.abs() < 1e-3 { 1e-3f64.copysign(x) } else { x }
        })
        .collect()
}

/// Uniform in [lo, hi].
pub fn rand_range(rng: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

/// Host element types the tests move to and from the device.
pub trait TestElem: DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin + 'static {
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// A value no kernel produces: NaN for floats, an out-of-range sentinel for ints.
    fn poison() -> Self;
}
impl TestElem for bf16 {
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn poison() -> Self {
        bf16::NAN
    }
}
impl TestElem for f16 {
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn poison() -> Self {
        f16::NAN
    }
}
impl TestElem for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn poison() -> Self {
        f32::NAN
    }
}
impl TestElem for i32 {
    fn from_f64(x: f64) -> Self {
        x as i32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn poison() -> Self {
        -0x5a5a5a5a
    }
}
impl TestElem for u8 {
    fn from_f64(x: f64) -> Self {
        x as u8
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn poison() -> Self {
        0xA5
    }
}

/// Round through the storage type: what the kernel actually sees.
pub fn quantize<T: TestElem>(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| T::from_f64(v).to_f64()).collect()
}

pub fn upload<T: TestElem>(rt: &Runtime, x: &[f64]) -> Result<CudaSlice<T>> {
    let h: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
    Ok(rt.stream().clone_htod(&h)?)
}

/// A device buffer of `n` poison values (so unwritten outputs fail the checks).
pub fn poisoned<T: TestElem>(rt: &Runtime, n: usize) -> Result<CudaSlice<T>> {
    Ok(rt.stream().clone_htod(&vec![T::poison(); n])?)
}

pub fn download<T: TestElem>(rt: &Runtime, x: &CudaSlice<T>) -> Result<Vec<f64>> {
    let h: Vec<T> = rt.stream().clone_dtoh(x)?;
    Ok(h.into_iter().map(|v| v.to_f64()).collect())
}

/// ||out - ref|| / ||ref||; infinite if `out` has a NaN or Inf.
pub fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len(), "rel_err: length mismatch");
    if out.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = out.iter().zip(reference).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = reference.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Assert `rel_err <= tol` and print the figure.
pub fn assert_close(what: &str, out: &[f64], reference: &[f64], tol: f64) {
    let e = rel_err(out, reference);
    println!("{what}: rel err {e:.3e} (tol {tol:.0e})");
    if !(e <= tol) {
        let bad = out.iter().zip(reference).enumerate().find(|(_, (a, b))| !a.is_finite() || (*a - *b).abs() > 10.0 * tol * b.abs().max(1e-3));
        panic!("{what}: rel err {e:.3e} > {tol:.0e}; first bad element {bad:?}");
    }
}

/// `cu_seqlens` of a ragged batch.
pub fn cu_seqlens(lens: &[usize]) -> Vec<i32> {
    let mut v = vec![0i32];
    for &l in lens {
        v.push(v.last().unwrap() + l as i32);
    }
    v
}

/// SPEC.md section 8 tolerance for an activation dtype.
pub fn tolerance(dtype: crate::DType) -> f64 {
    match dtype {
        crate::DType::F16 => 5e-3,
        _ => 1e-2,
    }
}

/// A fake, 256-byte-aligned device address of its own: each call returns the start
/// of a fresh 16 TiB region, so fake views never alias one another.
pub fn fake_address() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    0x0000_8000_0000_0000 + (NEXT.fetch_add(1, Ordering::Relaxed) % (1 << 19)) * (1 << 44)
}

/// A view over a fake device address ([`fake_address`]) holding `avail` elements,
/// for validation tests that run without a device (validation never dereferences it).
pub fn fake_view(dtype: crate::DType, shape: &[usize], strides: &[usize], avail: usize) -> crate::TensorRef<'static> {
    // SAFETY: the view is only ever validated, never launched on.
    unsafe { crate::TensorRef::from_raw(fake_address(), avail, dtype, shape, strides) }
}

/// A writable [`fake_contiguous`] view.
pub fn fake_contiguous_mut(dtype: crate::DType, shape: &[usize]) -> crate::TensorMut<'static> {
    let v = fake_contiguous(dtype, shape);
    // SAFETY: as above.
    unsafe { crate::TensorMut::from_raw(v.ptr(), shape.iter().product(), dtype, shape, v.strides()) }
}

/// A writable view of the same memory as `v` (for validation tests only).
pub fn as_writable(v: crate::TensorRef<'static>) -> crate::TensorMut<'static> {
    // SAFETY: the view is only ever validated, never launched on.
    let mut m = unsafe { crate::TensorMut::from_raw(v.ptr(), v.avail(), v.dtype(), v.shape(), v.strides()) };
    m.set_context(v.context());
    m
}

/// `v` as if it were memory of fake CUDA context `ctx` (device `ordinal`), for the
/// context checks without a device.
pub fn in_fake_context(mut v: crate::TensorRef<'static>, ctx: usize, ordinal: usize) -> crate::TensorRef<'static> {
    v.set_context(Some(fake_context(ctx, ordinal)));
    v
}

/// The [`ContextId`](crate::tensor::ContextId) of fake context `ctx` on device `ordinal`.
pub fn fake_context(ctx: usize, ordinal: usize) -> crate::tensor::ContextId {
    crate::tensor::ContextId { ctx, ordinal }
}

/// A contiguous [`fake_view`] of exactly `shape`.
pub fn fake_contiguous(dtype: crate::DType, shape: &[usize]) -> crate::TensorRef<'static> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    fake_view(dtype, shape, &strides, shape.iter().product())
}

/// The argument an `InvalidArgument` error names (printing its reason); panics on
/// any other error, so a test can assert which argument was rejected.
pub fn invalid_arg(e: crate::Error) -> &'static str {
    match e {
        crate::Error::InvalidArgument { arg, reason } => {
            println!("{arg}: {reason}");
            arg
        }
        other => panic!("expected InvalidArgument, got {other}"),
    }
}
