//! Gated DeltaNet with chunk commit (SPEC §4), as a token recurrence and in the
//! chunked WY / UT-transform form.

use super::{
    check_cu_seqlens, dot, l2_normalize, n_chunks, n_seqs, seq_range, slot_base, CHUNK, LABEL_ATTN,
    LABEL_GDN,
};

/// One GDN prefill problem. Layouts: q, k `[T, Hqk, dk]`; v `[T, Hv, dv]`;
/// g, beta `[T, Hv]`; labels `[num_slots, Hr]`; h0 `[N, Hv, dk, dv]`.
#[derive(Clone, Copy, Debug)]
pub struct GdnProblem<'a> {
    pub q: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    /// Log-decay per token and value head (alpha = exp(g)).
    pub g: &'a [f64],
    pub beta: &'a [f64],
    pub cu_seqlens: &'a [i32],
    pub hqk: usize,
    pub hv: usize,
    pub dk: usize,
    pub dv: usize,
    /// `(labels, Hr)`; `None` means every chunk is GDN (plain Gated DeltaNet). Complete
    /// chunks must be GDN or ATTN (anything else panics); a partial chunk's label is unused.
    pub labels: Option<(&'a [u8], usize)>,
    /// Initial state; `None` means zeros.
    pub h0: Option<&'a [f64]>,
    /// Output scale; `None` means dk^-1/2.
    pub scale: Option<f64>,
    /// L2-normalise q and k in the kernel.
    pub l2norm: bool,
}

/// GDN outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct GdnOutput {
    /// `[T, Hv, dv]`.
    pub o: Vec<f64>,
    /// `[N, Hv, dk, dv]`: S_c at the start of the partial last chunk, or the state after
    /// committing the last chunk when it is complete.
    pub state_committed: Vec<f64>,
    /// `[N, Hv, dk, dv]`: the recurrence run over the partial last chunk from the
    /// committed state (equal to `state_committed` when the last chunk is complete).
    pub state_running: Vec<f64>,
    /// `[N, Hv]`: sum of g over the partial last chunk (0 when complete).
    pub gsum_running: Vec<f64>,
}

impl GdnProblem<'_> {
    fn total_tokens(&self) -> usize {
        let t = check_cu_seqlens(self.cu_seqlens);
        let (hqk, hv, dk, dv) = (self.hqk, self.hv, self.dk, self.dv);
        assert!(
            hqk > 0 && hv.is_multiple_of(hqk),
            "Hv must be a multiple of Hqk"
        );
        assert_eq!(self.q.len(), t * hqk * dk, "q must be [T, Hqk, dk]");
        assert_eq!(self.k.len(), t * hqk * dk, "k must be [T, Hqk, dk]");
        assert_eq!(self.v.len(), t * hv * dv, "v must be [T, Hv, dv]");
        assert_eq!(self.g.len(), t * hv, "g must be [T, Hv]");
        assert_eq!(self.beta.len(), t * hv, "beta must be [T, Hv]");
        let n = n_seqs(self.cu_seqlens);
        if let Some((labels, hr)) = self.labels {
            assert!(
                hr > 0 && hv.is_multiple_of(hr),
                "Hv must be a multiple of Hr"
            );
            assert_eq!(
                labels.len(),
                super::num_slots(t, n) * hr,
                "labels must be [num_slots, Hr]"
            );
        }
        if let Some(h0) = self.h0 {
            assert_eq!(h0.len(), n * hv * dk * dv, "h0 must be [N, Hv, dk, dv]");
        }
        t
    }

    fn resolved_scale(&self) -> f64 {
        self.scale.unwrap_or(1.0 / (self.dk as f64).sqrt())
    }
}

/// The inputs of one chunk for one value head, gathered contiguously
/// (q, k already L2-normalised when requested).
struct ChunkInputs {
    len: usize,
    q: Vec<f64>,    // [len, dk]
    k: Vec<f64>,    // [len, dk]
    v: Vec<f64>,    // [len, dv]
    g: Vec<f64>,    // [len]
    beta: Vec<f64>, // [len]
}

/// Runs one chunk from state `s0` (`[dk, dv]`); returns (o `[len, dv]`, state at the end).
type ChunkFn = fn(&[f64], &ChunkInputs, usize, usize, f64) -> (Vec<f64>, Vec<f64>);

/// Token recurrence of SPEC §4 with chunk commit.
pub fn gdn_recurrent(p: &GdnProblem) -> GdnOutput {
    run_with_commit(p, chunk_recurrent)
}

/// Same computation in the chunked WY / UT-transform form.
pub fn gdn_chunked(p: &GdnProblem) -> GdnOutput {
    run_with_commit(p, chunk_wy)
}

/// One GDN token step on `state` (`[dk, dv]`, updated in place); returns o `[dv]`.
/// dk = `q.len()`, dv = `v.len()`. `scale = None` means dk^-1/2.
#[allow(clippy::too_many_arguments)]
pub fn gdn_decode_step(
    state: &mut [f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    g: f64,
    beta: f64,
    scale: Option<f64>,
    l2norm: bool,
) -> Vec<f64> {
    let (dk, dv) = (q.len(), v.len());
    assert_eq!(k.len(), dk, "k length");
    assert_eq!(state.len(), dk * dv, "state must be [dk, dv]");
    let scale = scale.unwrap_or(1.0 / (dk as f64).sqrt());
    let (q, k) = if l2norm {
        (l2_normalize(q), l2_normalize(k))
    } else {
        (q.to_vec(), k.to_vec())
    };
    let alpha = g.exp();
    state.iter_mut().for_each(|s| *s *= alpha);
    // u = beta * (v - S^T k)
    let u: Vec<f64> = (0..dv)
        .map(|b| beta * (v[b] - (0..dk).map(|a| state[a * dv + b] * k[a]).sum::<f64>()))
        .collect();
    for a in 0..dk {
        for b in 0..dv {
            state[a * dv + b] += k[a] * u[b];
        }
    }
    (0..dv)
        .map(|b| scale * (0..dk).map(|a| state[a * dv + b] * q[a]).sum::<f64>())
        .collect()
}

fn chunk_recurrent(
    s0: &[f64],
    c: &ChunkInputs,
    dk: usize,
    dv: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut s = s0.to_vec();
    let mut o = Vec::with_capacity(c.len * dv);
    for t in 0..c.len {
        let row = gdn_decode_step(
            &mut s,
            &c.q[t * dk..(t + 1) * dk],
            &c.k[t * dk..(t + 1) * dk],
            &c.v[t * dv..(t + 1) * dv],
            c.g[t],
            c.beta[t],
            Some(scale),
            false,
        );
        o.extend(row);
    }
    (o, s)
}

/// Chunked form. With G_t the cumulative gate inside the chunk (inclusive), unrolling
/// the recurrence gives, for the delta-rule updates u_t,
///   u_t + sum_{j<t} beta_t e^{G_t-G_j} (k_t·k_j) u_j = beta_t v_t - beta_t e^{G_t} k_t^T S0,
/// i.e. (I + A) U_true = diag(beta) V - diag(beta e^G) K S0, so with T = (I + A)^{-1},
/// U_true = U - W S0 (U = T diag(beta) V, W = T diag(beta e^G) K). Then
///   o_t = scale (e^{G_t} q_t^T S0 + sum_{j<=t} e^{G_t-G_j} (q_t·k_j) u_j),
///   S'  = e^{G_L} S0 + sum_j e^{G_L-G_j} k_j u_j^T.
fn chunk_wy(s0: &[f64], c: &ChunkInputs, dk: usize, dv: usize, scale: f64) -> (Vec<f64>, Vec<f64>) {
    let l = c.len;
    let kr = |t: usize| &c.k[t * dk..(t + 1) * dk];
    let qr = |t: usize| &c.q[t * dk..(t + 1) * dk];

    let gcum: Vec<f64> =
        c.g.iter()
            .scan(0.0, |acc, g| {
                *acc += g;
                Some(*acc)
            })
            .collect();

    // A: strictly lower, [l, l].
    let mut a = vec![0.0; l * l];
    for i in 0..l {
        for j in 0..i {
            a[i * l + j] = c.beta[i] * (gcum[i] - gcum[j]).exp() * dot(kr(i), kr(j));
        }
    }
    // T = (I + A)^{-1} by forward substitution: row i of T = e_i - sum_{j<i} A_ij T_j.
    let mut tm = vec![0.0; l * l];
    for i in 0..l {
        tm[i * l + i] = 1.0;
        for j in 0..i {
            let aij = a[i * l + j];
            for m in 0..=j {
                tm[i * l + m] -= aij * tm[j * l + m];
            }
        }
    }

    // W = T diag(beta e^G) K  [l, dk];  U = T diag(beta) V  [l, dv].
    let mut w = vec![0.0; l * dk];
    let mut u = vec![0.0; l * dv];
    for i in 0..l {
        for j in 0..=i {
            let t_ij = tm[i * l + j];
            let wk = t_ij * c.beta[j] * gcum[j].exp();
            let uv = t_ij * c.beta[j];
            for x in 0..dk {
                w[i * dk + x] += wk * c.k[j * dk + x];
            }
            for y in 0..dv {
                u[i * dv + y] += uv * c.v[j * dv + y];
            }
        }
    }

    // v_new = U - W S0.
    let mut v_new = u;
    for i in 0..l {
        for y in 0..dv {
            let ws: f64 = (0..dk).map(|x| w[i * dk + x] * s0[x * dv + y]).sum();
            v_new[i * dv + y] -= ws;
        }
    }

    // o = scale (diag(e^G) Q S0 + (Q K^T ⊙ decay mask incl. diagonal) v_new).
    let mut o = vec![0.0; l * dv];
    for i in 0..l {
        let eg = gcum[i].exp();
        let weights: Vec<f64> = (0..=i)
            .map(|j| (gcum[i] - gcum[j]).exp() * dot(qr(i), kr(j)))
            .collect();
        for y in 0..dv {
            let inter: f64 = (0..dk).map(|x| qr(i)[x] * s0[x * dv + y]).sum();
            let intra: f64 = weights
                .iter()
                .enumerate()
                .map(|(j, wt)| wt * v_new[j * dv + y])
                .sum();
            o[i * dv + y] = scale * (eg * inter + intra);
        }
    }

    // S' = e^{G_L} S0 + K^T diag(e^{G_L - G}) v_new.
    let g_last = gcum[l - 1];
    let mut s = s0.iter().map(|x| x * g_last.exp()).collect::<Vec<_>>();
    for j in 0..l {
        let d = (g_last - gcum[j]).exp();
        for x in 0..dk {
            let kd = c.k[j * dk + x] * d;
            for y in 0..dv {
                s[x * dv + y] += kd * v_new[j * dv + y];
            }
        }
    }
    (o, s)
}

/// Shared driver: walks every (sequence, value head) chunk by chunk, runs `chunk_fn`
/// from the committed state, and applies the commit rule to complete chunks.
fn run_with_commit(p: &GdnProblem, chunk_fn: ChunkFn) -> GdnOutput {
    let t_total = p.total_tokens();
    let (hqk, hv, dk, dv) = (p.hqk, p.hv, p.dk, p.dv);
    let n = n_seqs(p.cu_seqlens);
    let scale = p.resolved_scale();
    let sd = dk * dv;

    let mut o = vec![0.0; t_total * hv * dv];
    let mut committed = vec![0.0; n * hv * sd];
    let mut running = vec![0.0; n * hv * sd];
    let mut gsum_running = vec![0.0; n * hv];

    for s in 0..n {
        let range = seq_range(p.cu_seqlens, s);
        let base = slot_base(p.cu_seqlens, s);
        for i in 0..hv {
            let hk = i / (hv / hqk);
            let sidx = (s * hv + i) * sd;
            let mut state = match p.h0 {
                Some(h0) => h0[sidx..sidx + sd].to_vec(),
                None => vec![0.0; sd],
            };
            let mut run_state = state.clone();
            let mut run_gsum = 0.0;
            for c in 0..n_chunks(range.len()) {
                let start = range.start + c * CHUNK;
                let end = (start + CHUNK).min(range.end);
                let chunk = gather(p, start..end, i, hk);
                let (oc, s_end) = chunk_fn(&state, &chunk, dk, dv, scale);
                for (t, row) in (start..end).zip(oc.chunks(dv)) {
                    o[(t * hv + i) * dv..(t * hv + i + 1) * dv].copy_from_slice(row);
                }
                let gsum: f64 = chunk.g.iter().sum();
                if chunk.len == CHUNK {
                    let label = match p.labels {
                        Some((labels, hr)) => labels[(base + c) * hr + i / (hv / hr)],
                        None => LABEL_GDN,
                    };
                    state = match label {
                        LABEL_GDN => s_end,
                        LABEL_ATTN => state.iter().map(|x| x * gsum.exp()).collect(),
                        other => panic!("complete chunk {c} of sequence {s} has label {other}"),
                    };
                    run_state = state.clone();
                    run_gsum = 0.0;
                } else {
                    run_state = s_end;
                    run_gsum = gsum;
                }
            }
            committed[sidx..sidx + sd].copy_from_slice(&state);
            running[sidx..sidx + sd].copy_from_slice(&run_state);
            gsum_running[s * hv + i] = run_gsum;
        }
    }
    GdnOutput {
        o,
        state_committed: committed,
        state_running: running,
        gsum_running,
    }
}

fn gather(p: &GdnProblem, tokens: std::ops::Range<usize>, i: usize, hk: usize) -> ChunkInputs {
    let (hqk, hv, dk, dv) = (p.hqk, p.hv, p.dk, p.dv);
    let norm = |x: &[f64]| {
        if p.l2norm {
            l2_normalize(x)
        } else {
            x.to_vec()
        }
    };
    let mut c = ChunkInputs {
        len: tokens.len(),
        q: Vec::new(),
        k: Vec::new(),
        v: Vec::new(),
        g: Vec::new(),
        beta: Vec::new(),
    };
    for t in tokens {
        let qk = (t * hqk + hk) * dk;
        c.q.extend(norm(&p.q[qk..qk + dk]));
        c.k.extend(norm(&p.k[qk..qk + dk]));
        c.v.extend_from_slice(&p.v[(t * hv + i) * dv..(t * hv + i + 1) * dv]);
        c.g.push(p.g[t * hv + i]);
        c.beta.push(p.beta[t * hv + i]);
    }
    c
}
