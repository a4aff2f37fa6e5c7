//! f64 CPU reference ("oracle") for every natsl kernel.
//!
//! Implements the definitions of `SPEC.md` literally, in f64, with no attempt at
//! speed. Kernels are checked against these functions.
//!
//! # Conventions (shared by every kernel and test)
//!
//! - Chunk size [`CHUNK`] = 64 tokens; chunks are aligned to each sequence's start.
//! - `cu_seqlens: &[i32]`, length N+1, `cu[0] = 0`, strictly increasing, `cu[N] = T`.
//! - Chunk slots: chunk `c` of sequence `n` lives at slot `slot_base(n) + c` with
//!   `slot_base(n) = cu[n] / 64 + n`, so kernels find per-sequence chunk storage
//!   without a prefix sum. A batch needs `num_slots(T, N) = T / 64 + N` slots
//!   (slot ranges of different sequences never overlap because
//!   `floor((s + len) / 64) + 1 >= floor(s / 64) + ceil(len / 64)`).
//! - Labels: `u8`, layout `[num_slots, Hr]` (index `slot * Hr + r`):
//!   [`LABEL_GDN`] = 0, [`LABEL_ATTN`] = 1, [`LABEL_PARTIAL`] = 2 (an incomplete last
//!   chunk, not labelled). Slots not used by any chunk hold 0.
//! - Compact ATTN list: `attn_list: [Hr, num_slots]` i32; the list of (n, r) starts at
//!   `r * num_slots + slot_base(n)` and holds the local (0-based within the sequence)
//!   indices of the ATTN chunks, ascending. `attn_count: [N, Hr]` i32. Unused entries 0.
//! - Tensors are flat `&[f64]`, token-major and contiguous: `[T, H, D]` has index
//!   `(t * H + h) * D + d`. GDN states are `[N, Hv, dk, dv]` row-major.
//! - Head maps: GDN value head `i` uses q/k head `i / (Hv / Hqk)` and routing head
//!   `i / (Hv / Hr)`; softmax query head `j` uses kv head `j / (Hq / Hkv)`, and kv head
//!   `h` uses routing head `h / (Hkv / Hr)`.
//! - Merge: weight 0 multiplies the GDN branch; router logit 0 is ATTN.

pub mod gdn;
pub mod hybrid;
pub mod merge;
pub mod router;
pub mod sparse;

pub use gdn::*;
pub use hybrid::*;
pub use merge::*;
pub use router::*;
pub use sparse::*;

/// Tokens per chunk.
pub const CHUNK: usize = 64;

/// Chunk folded into the GDN state; its K/V are dropped.
pub const LABEL_GDN: u8 = 0;
/// Chunk kept in the softmax KV cache; it only decays the GDN state.
pub const LABEL_ATTN: u8 = 1;
/// Incomplete last chunk: not labelled yet.
pub const LABEL_PARTIAL: u8 = 2;

/// Epsilon of every normalisation (L2, RMS) in the spec.
pub const NORM_EPS: f64 = 1e-6;

/// Number of chunks of a sequence of `len` tokens (the last one may be partial).
pub fn n_chunks(len: usize) -> usize {
    len.div_ceil(CHUNK)
}

/// First chunk slot of sequence `n`.
pub fn slot_base(cu_seqlens: &[i32], n: usize) -> usize {
    cu_seqlens[n] as usize / CHUNK + n
}

/// Number of chunk slots of a batch of `n_seqs` sequences with `total_tokens` tokens.
pub fn num_slots(total_tokens: usize, n_seqs: usize) -> usize {
    total_tokens / CHUNK + n_seqs
}

/// Number of sequences in a batch.
pub fn n_seqs(cu_seqlens: &[i32]) -> usize {
    cu_seqlens.len() - 1
}

/// Token range `[start, end)` of sequence `n`.
pub fn seq_range(cu_seqlens: &[i32], n: usize) -> std::ops::Range<usize> {
    cu_seqlens[n] as usize..cu_seqlens[n + 1] as usize
}

/// Panics unless `cu_seqlens` is a valid boundary array; returns T.
pub fn check_cu_seqlens(cu_seqlens: &[i32]) -> usize {
    assert!(cu_seqlens.len() >= 2, "cu_seqlens needs at least 2 entries");
    assert_eq!(cu_seqlens[0], 0, "cu_seqlens[0] must be 0");
    for w in cu_seqlens.windows(2) {
        assert!(w[0] < w[1], "cu_seqlens must be strictly increasing");
    }
    *cu_seqlens.last().unwrap() as usize
}

/// Relative error `||out - reference|| / ||reference||` (2-norm; absolute error if the
/// reference is all zeros). NaN or Inf in `out` gives infinity.
pub fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len(), "rel_err: length mismatch");
    if out.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let diff: f64 = out
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b) * (a - b))
        .sum();
    let norm: f64 = reference.iter().map(|b| b * b).sum();
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// Largest elementwise absolute difference.
pub fn max_abs_diff(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len(), "max_abs_diff: length mismatch");
    out.iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `x / sqrt(sum x^2 + eps)` (GDN's in-kernel q/k normalisation).
pub fn l2_normalize(x: &[f64]) -> Vec<f64> {
    let inv = 1.0 / (dot(x, x) + NORM_EPS).sqrt();
    x.iter().map(|v| v * inv).collect()
}

/// `x * w / sqrt(mean x^2 + eps)`; `w = None` means unit weight.
pub fn rms_normalize(x: &[f64], w: Option<&[f64]>) -> Vec<f64> {
    let inv = 1.0 / (dot(x, x) / x.len() as f64 + NORM_EPS).sqrt();
    match w {
        Some(w) => {
            assert_eq!(w.len(), x.len(), "rms weight length");
            x.iter().zip(w).map(|(v, w)| v * w * inv).collect()
        }
        None => x.iter().map(|v| v * inv).collect(),
    }
}
