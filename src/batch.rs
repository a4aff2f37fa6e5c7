//! A packed variable-length batch (`cu_seqlens`), validated once on the host and
//! uploaded once, then shared by every op of a forward pass.

use crate::error::{Error, Result};
use crate::params::NatslVarlen;
use crate::runtime::Runtime;
use crate::tensor::ContextId;
use cudarc::driver::{CudaSlice, DevicePtr};

/// Tokens per chunk.
pub const CHUNK: usize = 64;

/// A validated `cu_seqlens`, host side only: everything validation needs, so
/// that shape checks run (and are tested) without a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLayout {
    cu_host: Vec<i32>,
    max_chunks: usize,
}

impl SeqLayout {
    /// Validate `cu_seqlens` (`[N+1]`, starts at 0, strictly rising: no empty sequence).
    pub fn new(cu_seqlens: &[i32]) -> Result<SeqLayout> {
        let max_chunks = validate_cu_seqlens(cu_seqlens)?;
        Ok(SeqLayout { cu_host: cu_seqlens.to_vec(), max_chunks })
    }
    pub fn cu_seqlens(&self) -> &[i32] {
        &self.cu_host
    }
    pub fn num_seqs(&self) -> usize {
        self.cu_host.len() - 1
    }
    pub fn total_tokens(&self) -> usize {
        *self.cu_host.last().unwrap() as usize
    }
    /// Chunk slots: `T / 64 + N` (see `NatslVarlen`).
    pub fn num_slots(&self) -> usize {
        num_slots(self.total_tokens(), self.num_seqs())
    }
    pub fn max_chunks(&self) -> usize {
        self.max_chunks
    }
    /// Tokens of sequence `n`; 0 (no sequence is empty) when `n` is out of range, like
    /// [`crate::TensorRef::dim`].
    pub fn seq_len(&self, n: usize) -> usize {
        match (self.cu_host.get(n), self.cu_host.get(n.wrapping_add(1))) {
            (Some(&a), Some(&b)) => (b - a) as usize,
            _ => 0,
        }
    }
    /// Fewest complete chunks of any sequence.
    pub fn min_complete_chunks(&self) -> usize {
        (0..self.num_seqs()).map(|n| self.seq_len(n) / CHUNK).min().unwrap_or(0)
    }
    /// The token count a tensor must have for this batch.
    pub fn check_tokens(&self, arg: &'static str, t: usize) -> Result<()> {
        if t != self.total_tokens() {
            return Err(Error::invalid(arg, format!("has {t} tokens, but cu_seqlens ends at {}", self.total_tokens())));
        }
        Ok(())
    }
}

/// A validated `cu_seqlens` on host ([`SeqLayout`], through `Deref`) and device.
#[derive(Debug)]
pub struct Batch {
    layout: SeqLayout,
    cu_dev: CuDev,
}

/// The device copy: uploaded by natsl, or the caller's ([`Batch::from_device`]).
#[derive(Debug)]
enum CuDev {
    Owned(CudaSlice<i32>),
    Raw(u64),
}

impl Batch {
    /// Validate `cu_seqlens` and upload it.
    pub fn new(rt: &Runtime, cu_seqlens: &[i32]) -> Result<Batch> {
        let layout = SeqLayout::new(cu_seqlens)?;
        let cu_dev = CuDev::Owned(rt.stream().clone_htod(cu_seqlens)?);
        Ok(Batch { layout, cu_dev })
    }
    /// Validate `cu_seqlens` on the host and use the caller's device copy of it
    /// (no upload: e.g. the engine's own tensor, inside a CUDA graph).
    ///
    /// # Safety
    /// `cu_seqlens_device` must point to `cu_seqlens.len()` i32 in device memory of the
    /// context the batch is used with, holding exactly `cu_seqlens`, unchanged and
    /// alive while calls that use the batch may run.
    pub unsafe fn from_device(cu_seqlens: &[i32], cu_seqlens_device: u64) -> Result<Batch> {
        let layout = SeqLayout::new(cu_seqlens)?;
        if cu_seqlens_device == 0 || cu_seqlens_device % 4 != 0 {
            return Err(Error::invalid("cu_seqlens_device", format!("{cu_seqlens_device:#x} is not an aligned device pointer")));
        }
        Ok(Batch { layout, cu_dev: CuDev::Raw(cu_seqlens_device) })
    }
    pub fn layout(&self) -> &SeqLayout {
        &self.layout
    }
    /// The device copy of `cu_seqlens` (a device address).
    pub fn cu_seqlens_device(&self) -> u64 {
        match &self.cu_dev {
            CuDev::Owned(d) => d.device_ptr(d.stream()).0,
            CuDev::Raw(p) => *p,
        }
    }
    /// The CUDA context `cu_seqlens` was uploaded to (`None` for the caller's device
    /// copy of [`Batch::from_device`], which is the caller's to get right).
    pub fn context(&self) -> Option<ContextId> {
        match &self.cu_dev {
            CuDev::Owned(d) => Some(ContextId::of(d.context())),
            CuDev::Raw(_) => None,
        }
    }
    /// The ABI form.
    pub fn raw(&self) -> NatslVarlen {
        let p = self.cu_seqlens_device();
        NatslVarlen {
            cu_seqlens: p as *const i32,
            num_seqs: self.num_seqs() as i32,
            total_tokens: self.total_tokens() as i32,
            num_slots: self.num_slots() as i32,
            max_chunks: self.max_chunks() as i32,
        }
    }
}

impl std::ops::Deref for Batch {
    type Target = SeqLayout;
    fn deref(&self) -> &SeqLayout {
        &self.layout
    }
}

pub fn num_slots(total_tokens: usize, num_seqs: usize) -> usize {
    total_tokens / CHUNK + num_seqs
}

/// Check `cu_seqlens`; returns the largest chunk count of any sequence.
pub fn validate_cu_seqlens(cu: &[i32]) -> Result<usize> {
    const ARG: &str = "cu_seqlens";
    if cu.len() < 2 {
        return Err(Error::invalid(ARG, format!("needs at least 2 entries (one sequence), got {}", cu.len())));
    }
    if cu[0] != 0 {
        return Err(Error::invalid(ARG, format!("must start at 0, starts at {}", cu[0])));
    }
    let mut max_chunks = 0;
    for n in 0..cu.len() - 1 {
        let len = cu[n + 1] as i64 - cu[n] as i64;
        if len < 0 {
            return Err(Error::invalid(ARG, format!("must rise: entry {} ({}) < entry {n} ({})", n + 1, cu[n + 1], cu[n])));
        }
        if len == 0 {
            return Err(Error::invalid(ARG, format!("sequence {n} is empty")));
        }
        max_chunks = max_chunks.max((len as usize).div_ceil(CHUNK));
    }
    Ok(max_chunks)
}
