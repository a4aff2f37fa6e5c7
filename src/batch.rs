//! A packed variable-length batch (`cu_seqlens`), validated once on the host and
//! uploaded once, then shared by every op of a forward pass.

use crate::error::{Error, Result};
use crate::params::NatslVarlen;
use crate::runtime::Runtime;
use cudarc::driver::{CudaSlice, DevicePtr};

/// Tokens per chunk.
pub const CHUNK: usize = 64;

/// A validated `cu_seqlens` on host and device.
#[derive(Debug)]
pub struct Batch {
    cu_host: Vec<i32>,
    cu_dev: CudaSlice<i32>,
    max_chunks: usize,
}

impl Batch {
    /// Validate `cu_seqlens` (`[N+1]`, starts at 0, strictly rising: no empty
    /// sequence) and upload it.
    pub fn new(rt: &Runtime, cu_seqlens: &[i32]) -> Result<Batch> {
        let max_chunks = validate_cu_seqlens(cu_seqlens)?;
        let cu_dev = rt.stream().clone_htod(cu_seqlens)?;
        Ok(Batch { cu_host: cu_seqlens.to_vec(), cu_dev, max_chunks })
    }
    pub fn cu_seqlens(&self) -> &[i32] {
        &self.cu_host
    }
    pub fn cu_seqlens_device(&self) -> &CudaSlice<i32> {
        &self.cu_dev
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
    pub fn seq_len(&self, n: usize) -> usize {
        (self.cu_host[n + 1] - self.cu_host[n]) as usize
    }
    /// The ABI form.
    pub fn raw(&self) -> NatslVarlen {
        let (p, _g) = self.cu_dev.device_ptr(self.cu_dev.stream());
        NatslVarlen {
            cu_seqlens: p as *const i32,
            num_seqs: self.num_seqs() as i32,
            total_tokens: self.total_tokens() as i32,
            num_slots: self.num_slots() as i32,
            max_chunks: self.max_chunks as i32,
        }
    }
    /// The token count a tensor must have for this batch.
    pub fn check_tokens(&self, arg: &'static str, t: usize) -> Result<()> {
        if t != self.total_tokens() {
            return Err(Error::invalid(arg, format!("has {t} tokens, but cu_seqlens ends at {}", self.total_tokens())));
        }
        Ok(())
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
