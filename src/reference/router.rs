//! Router (SPEC §3): mean-pool each chunk, score it, select ATTN chunks.

use super::{
    check_cu_seqlens, dot, n_chunks, n_seqs, num_slots, seq_range, slot_base, CHUNK, LABEL_ATTN,
    LABEL_GDN, LABEL_PARTIAL,
};

/// How complete chunks are turned into labels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RouterPolicy {
    /// The model's rule: ATTN iff `l0 >= l1` (ties go to ATTN).
    Argmax,
    /// Per (sequence, routing head) the k complete chunks with the largest margin
    /// `l0 - l1` are ATTN (ties: the lower chunk index wins).
    TopK(usize),
    /// Top-k with `k = ceil(rho * n_complete_chunks)`.
    KeepFraction(f64),
}

/// Router outputs; layouts as in the module conventions.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterOutput {
    /// `[num_slots, Hr, 2]`; index 0 = ATTN score. Unused slots hold 0.
    pub logits: Vec<f64>,
    /// `[num_slots, Hr]`.
    pub labels: Vec<u8>,
    /// `[Hr, num_slots]`.
    pub attn_list: Vec<i32>,
    /// `[N, Hr]`.
    pub attn_count: Vec<i32>,
}

/// Rounds to bf16 (round to nearest even), the activation dtype of the model.
pub fn round_bf16(x: f64) -> f64 {
    half::bf16::from_f64(x).to_f64()
}

/// Rounds to f16 (round to nearest even).
pub fn round_f16(x: f64) -> f64 {
    half::f16::from_f64(x).to_f64()
}

/// No rounding (pure f64 router).
pub fn round_none(x: f64) -> f64 {
    x
}

/// `k` of the keep-fraction policy: `ceil(rho * n - 1e-6)` in f64, the same
/// expression the kernel evaluates. The epsilon stops products such as
/// `0.1 * 30 = 3.0000000000000004`, or an f32 rho like `0.3f32 * 10`, from
/// rounding up to the next integer.
pub fn keep_fraction_k(rho: f64, n_complete: usize) -> usize {
    let k = (rho * n_complete as f64 - 1e-6).ceil();
    if k <= 0.0 {
        0
    } else {
        k as usize
    }
}

/// Logits `[Hr, 2]` of one pooled chunk `m` (`[D]`): `l[h, o] = W_score[2h + o] · m`.
pub fn score_chunk(m: &[f64], w_score: &[f64], hr: usize) -> Vec<f64> {
    let d = m.len();
    assert_eq!(w_score.len(), 2 * hr * d, "w_score must be [2*Hr, D]");
    (0..2 * hr)
        .map(|row| dot(&w_score[row * d..(row + 1) * d], m))
        .collect()
}

/// Mean of the rows `x[range]` of a `[T, D]` tensor (summed in token order, then divided),
/// passed through `round`.
pub fn pool_chunk(
    x: &[f64],
    d: usize,
    tokens: std::ops::Range<usize>,
    round: fn(f64) -> f64,
) -> Vec<f64> {
    let n = tokens.len() as f64;
    let mut sum = vec![0.0; d];
    for t in tokens {
        for (s, v) in sum.iter_mut().zip(&x[t * d..(t + 1) * d]) {
            *s += v;
        }
    }
    sum.iter().map(|s| round(s / n)).collect()
}

/// Runs the router over a packed batch. `x`: `[T, D]`, `w_score`: `[2*Hr, D]`.
pub fn router(
    x: &[f64],
    w_score: &[f64],
    cu_seqlens: &[i32],
    d: usize,
    hr: usize,
    policy: RouterPolicy,
    round: fn(f64) -> f64,
) -> RouterOutput {
    let t_total = check_cu_seqlens(cu_seqlens);
    assert_eq!(x.len(), t_total * d, "x must be [T, D]");
    assert_eq!(w_score.len(), 2 * hr * d, "w_score must be [2*Hr, D]");
    let n = n_seqs(cu_seqlens);
    let slots = num_slots(t_total, n);

    let mut logits = vec![0.0; slots * hr * 2];
    let mut labels = vec![LABEL_GDN; slots * hr];
    for s in 0..n {
        let range = seq_range(cu_seqlens, s);
        let len = range.len();
        let base = slot_base(cu_seqlens, s);
        let complete = len / CHUNK;
        for c in 0..n_chunks(len) {
            let start = range.start + c * CHUNK;
            let end = (start + CHUNK).min(range.end);
            let m = pool_chunk(x, d, start..end, round);
            let l = score_chunk(&m, w_score, hr);
            logits[(base + c) * hr * 2..(base + c + 1) * hr * 2].copy_from_slice(&l);
        }
        for r in 0..hr {
            let logit = |c: usize, o: usize| logits[((base + c) * hr + r) * 2 + o];
            let attn: Vec<bool> = match policy {
                RouterPolicy::Argmax => (0..complete).map(|c| logit(c, 0) >= logit(c, 1)).collect(),
                RouterPolicy::TopK(k) => top_k(complete, k, |c| logit(c, 0) - logit(c, 1)),
                RouterPolicy::KeepFraction(rho) => {
                    top_k(complete, keep_fraction_k(rho, complete), |c| {
                        logit(c, 0) - logit(c, 1)
                    })
                }
            };
            for (c, &a) in attn.iter().enumerate() {
                labels[(base + c) * hr + r] = if a { LABEL_ATTN } else { LABEL_GDN };
            }
            if complete < n_chunks(len) {
                labels[(base + complete) * hr + r] = LABEL_PARTIAL;
            }
        }
    }
    let (attn_list, attn_count) = attn_list_from_labels(&labels, cu_seqlens, hr);
    RouterOutput {
        logits,
        labels,
        attn_list,
        attn_count,
    }
}

/// Marks the `k` of `n` chunks with the largest margin (ties: lower index first).
fn top_k(n: usize, k: usize, margin: impl Fn(usize) -> f64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..n).collect();
    // Stable sort on descending margin keeps equal margins in ascending index order.
    order.sort_by(|&a, &b| {
        margin(b)
            .partial_cmp(&margin(a))
            .expect("NaN router margin")
    });
    let mut attn = vec![false; n];
    for &c in order.iter().take(k) {
        attn[c] = true;
    }
    attn
}

/// Builds the compact ATTN list `[Hr, num_slots]` and counts `[N, Hr]` from labels
/// `[num_slots, Hr]` (only the sequence's complete chunks are considered).
pub fn attn_list_from_labels(labels: &[u8], cu_seqlens: &[i32], hr: usize) -> (Vec<i32>, Vec<i32>) {
    let t_total = check_cu_seqlens(cu_seqlens);
    let n = n_seqs(cu_seqlens);
    let slots = num_slots(t_total, n);
    assert_eq!(labels.len(), slots * hr, "labels must be [num_slots, Hr]");
    let mut list = vec![0i32; hr * slots];
    let mut count = vec![0i32; n * hr];
    for s in 0..n {
        let base = slot_base(cu_seqlens, s);
        let complete = seq_range(cu_seqlens, s).len() / CHUNK;
        for r in 0..hr {
            let mut m = 0;
            for c in 0..complete {
                if labels[(base + c) * hr + r] == LABEL_ATTN {
                    list[r * slots + base + m] = c as i32;
                    m += 1;
                }
            }
            count[s * hr + r] = m as i32;
        }
    }
    (list, count)
}
