//! Block-sparse softmax attention (SPEC §5): prefill, decode, and a dense causal check.

use super::{
    check_cu_seqlens, n_seqs, num_slots, rms_normalize, seq_range, slot_base, CHUNK, LABEL_ATTN,
};

/// One softmax attention problem. Layouts: q `[Tq, Hq, dk]`, k `[T, Hkv, dk]`,
/// v `[T, Hkv, dv]`. For prefill Tq = T; for [`sparse_decode`] q holds the new queries,
/// `[N * nq, Hq, dk]` (query m of sequence n at row `n * nq + m`).
#[derive(Clone, Copy, Debug)]
pub struct AttnProblem<'a> {
    pub q: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    pub cu_seqlens: &'a [i32],
    pub hq: usize,
    pub hkv: usize,
    pub dk: usize,
    pub dv: usize,
    /// Score scale; `None` means dk^-1/2.
    pub scale: Option<f64>,
    /// RMSNorm weights `[dk]` applied to every q / k head before the dot product.
    pub q_norm_w: Option<&'a [f64]>,
    pub k_norm_w: Option<&'a [f64]>,
}

/// Attention outputs: o `[Tq, Hq, dv]`, lse `[Tq, Hq]` (natural log of the sum of
/// exp of the scaled scores).
#[derive(Clone, Debug, PartialEq)]
pub struct AttnOutput {
    pub o: Vec<f64>,
    pub lse: Vec<f64>,
}

impl AttnProblem<'_> {
    /// Checks k/v shapes; returns T.
    fn check_kv(&self) -> usize {
        let t = check_cu_seqlens(self.cu_seqlens);
        assert!(
            self.hkv > 0 && self.hq.is_multiple_of(self.hkv),
            "Hq must be a multiple of Hkv"
        );
        assert_eq!(
            self.k.len(),
            t * self.hkv * self.dk,
            "k must be [T, Hkv, dk]"
        );
        assert_eq!(
            self.v.len(),
            t * self.hkv * self.dv,
            "v must be [T, Hkv, dv]"
        );
        t
    }

    fn q_row(&self, row: usize, j: usize) -> Vec<f64> {
        let off = (row * self.hq + j) * self.dk;
        self.normed(&self.q[off..off + self.dk], self.q_norm_w)
    }

    fn k_row(&self, t: usize, h: usize) -> Vec<f64> {
        let off = (t * self.hkv + h) * self.dk;
        self.normed(&self.k[off..off + self.dk], self.k_norm_w)
    }

    fn v_row(&self, t: usize, h: usize) -> &[f64] {
        let off = (t * self.hkv + h) * self.dv;
        &self.v[off..off + self.dv]
    }

    fn normed(&self, x: &[f64], w: Option<&[f64]>) -> Vec<f64> {
        match w {
            Some(w) => rms_normalize(x, Some(w)),
            None => x.to_vec(),
        }
    }

    /// Attention of query row `row`, head `j`, over the key tokens `keys`.
    fn attend_tokens(
        &self,
        row: usize,
        j: usize,
        keys: impl IntoIterator<Item = usize>,
    ) -> (Vec<f64>, f64) {
        let h = j / (self.hq / self.hkv);
        let q = self.q_row(row, j);
        let (ks, vs): (Vec<Vec<f64>>, Vec<&[f64]>) = keys
            .into_iter()
            .map(|t| (self.k_row(t, h), self.v_row(t, h)))
            .unzip();
        let ks: Vec<&[f64]> = ks.iter().map(Vec::as_slice).collect();
        softmax_attend(
            &q,
            &ks,
            &vs,
            self.scale.unwrap_or(1.0 / (self.dk as f64).sqrt()),
        )
    }
}

/// `sum_t softmax_t(scale q·k_t) v_t` over the given keys/values, and its log-sum-exp.
pub fn softmax_attend(
    q: &[f64],
    keys: &[&[f64]],
    values: &[&[f64]],
    scale: f64,
) -> (Vec<f64>, f64) {
    assert!(!keys.is_empty(), "a query must see at least one key");
    assert_eq!(keys.len(), values.len(), "one value per key");
    let scores: Vec<f64> = keys.iter().map(|k| scale * super::dot(q, k)).collect();
    // Subtract the max so exp never overflows.
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f64 = weights.iter().sum();
    let mut o = vec![0.0; values[0].len()];
    for (v, w) in values.iter().zip(&weights) {
        for (acc, x) in o.iter_mut().zip(v.iter()) {
            *acc += w / sum * x;
        }
    }
    (o, max + sum.ln())
}

/// Key tokens visible to the query at absolute position `i` of sequence `s` for kv head
/// `h`: earlier ATTN chunks of routing head `h / (Hkv / Hr)`, plus own chunk up to `i`.
fn visible_keys(
    p: &AttnProblem,
    labels: &[u8],
    hr: usize,
    s: usize,
    h: usize,
    i: usize,
) -> Vec<usize> {
    let range = seq_range(p.cu_seqlens, s);
    let r = h / (p.hkv / hr);
    let base = slot_base(p.cu_seqlens, s);
    let c = (i - range.start) / CHUNK;
    let own_start = range.start + c * CHUNK;
    let mut keys = Vec::new();
    for cp in 0..c {
        if labels[(base + cp) * hr + r] == LABEL_ATTN {
            keys.extend(range.start + cp * CHUNK..range.start + (cp + 1) * CHUNK);
        }
    }
    keys.extend(own_start..=i);
    keys
}

fn check_labels(p: &AttnProblem, labels: &[u8], hr: usize, t: usize) {
    assert!(
        hr > 0 && p.hkv.is_multiple_of(hr),
        "Hkv must be a multiple of Hr"
    );
    assert_eq!(
        labels.len(),
        num_slots(t, n_seqs(p.cu_seqlens)) * hr,
        "labels must be [num_slots, Hr]"
    );
}

/// Block-sparse prefill: every query of every sequence, labels `[num_slots, Hr]`.
pub fn sparse_attention(p: &AttnProblem, labels: &[u8], hr: usize) -> AttnOutput {
    let t = p.check_kv();
    assert_eq!(p.q.len(), t * p.hq * p.dk, "q must be [T, Hq, dk]");
    check_labels(p, labels, hr, t);
    let mut out = AttnOutput {
        o: vec![0.0; t * p.hq * p.dv],
        lse: vec![0.0; t * p.hq],
    };
    for s in 0..n_seqs(p.cu_seqlens) {
        for i in seq_range(p.cu_seqlens, s) {
            for j in 0..p.hq {
                let keys = visible_keys(p, labels, hr, s, j / (p.hq / p.hkv), i);
                let (o, lse) = p.attend_tokens(i, j, keys);
                out.o[(i * p.hq + j) * p.dv..(i * p.hq + j + 1) * p.dv].copy_from_slice(&o);
                out.lse[i * p.hq + j] = lse;
            }
        }
    }
    out
}

/// Block-sparse decode: the last `nq` tokens of every sequence are the new ones; their
/// queries are `p.q` (`[N * nq, Hq, dk]`) and their keys/values are already part of the
/// history `p.k`, `p.v`. Returns o `[N * nq, Hq, dv]`, lse `[N * nq, Hq]`.
pub fn sparse_decode(p: &AttnProblem, labels: &[u8], hr: usize, nq: usize) -> AttnOutput {
    let t = p.check_kv();
    let n = n_seqs(p.cu_seqlens);
    assert!((1..=8).contains(&nq), "nq must be in 1..=8");
    assert_eq!(
        p.q.len(),
        n * nq * p.hq * p.dk,
        "q must be [N * nq, Hq, dk]"
    );
    check_labels(p, labels, hr, t);
    let mut out = AttnOutput {
        o: vec![0.0; n * nq * p.hq * p.dv],
        lse: vec![0.0; n * nq * p.hq],
    };
    for s in 0..n {
        let range = seq_range(p.cu_seqlens, s);
        assert!(range.len() >= nq, "sequence {s} is shorter than nq");
        for m in 0..nq {
            let i = range.end - nq + m;
            let row = s * nq + m;
            for j in 0..p.hq {
                let keys = visible_keys(p, labels, hr, s, j / (p.hq / p.hkv), i);
                let (o, lse) = p.attend_tokens(row, j, keys);
                out.o[(row * p.hq + j) * p.dv..(row * p.hq + j + 1) * p.dv].copy_from_slice(&o);
                out.lse[row * p.hq + j] = lse;
            }
        }
    }
    out
}

/// Ordinary causal attention per sequence (no chunks, no labels): the independent check
/// for the all-ATTN case.
pub fn dense_causal_attention(p: &AttnProblem) -> AttnOutput {
    let t = p.check_kv();
    assert_eq!(p.q.len(), t * p.hq * p.dk, "q must be [T, Hq, dk]");
    let mut out = AttnOutput {
        o: vec![0.0; t * p.hq * p.dv],
        lse: vec![0.0; t * p.hq],
    };
    for s in 0..n_seqs(p.cu_seqlens) {
        let range = seq_range(p.cu_seqlens, s);
        for i in range.clone() {
            for j in 0..p.hq {
                let (o, lse) = p.attend_tokens(i, j, range.start..=i);
                out.o[(i * p.hq + j) * p.dv..(i * p.hq + j + 1) * p.dv].copy_from_slice(&o);
                out.lse[i * p.hq + j] = lse;
            }
        }
    }
    out
}
