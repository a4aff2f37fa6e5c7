//! The whole NAtS-L layer: prefill (router -> GDN -> sparse softmax -> merge) and one
//! decode step with the hybrid cache (SPEC §7).
//!
//! The softmax heads are views of the GDN q/k/v rows: softmax head j reads the j-th
//! dks-wide slice of q and k and the j-th dvs-wide slice of v, and belongs to routing
//! head j / (ha / h). Because h * dk == ha * dks, routing head r's softmax heads cover
//! exactly GDN head r's dk-wide k slice and dv-wide v slice, so the cache keeps K/V pages
//! per routing head as those slices.

use super::{
    gdn_decode_step, gdn_recurrent, merge, n_seqs, rms_normalize, router, score_chunk, seq_range,
    slot_base, softmax_attend, sparse_attention, AttnOutput, AttnProblem, GdnOutput, GdnProblem, RouterOutput,
    RouterPolicy, CHUNK, LABEL_ATTN, LABEL_GDN,
};

/// Layer dimensions. `h` GDN heads (= routing heads) of dk / dv; `ha` softmax heads of
/// dks / dvs, with h * dk == ha * dks and h * dv == ha * dvs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatslDims {
    pub d_model: usize,
    pub h: usize,
    pub dk: usize,
    pub dv: usize,
    pub ha: usize,
    pub dks: usize,
    pub dvs: usize,
}

impl NatslDims {
    fn check(&self) {
        assert!(
            self.h > 0 && self.ha.is_multiple_of(self.h),
            "ha must be a multiple of h"
        );
        assert_eq!(
            self.h * self.dk,
            self.ha * self.dks,
            "h * dk must equal ha * dks"
        );
        assert_eq!(
            self.h * self.dv,
            self.ha * self.dvs,
            "h * dv must equal ha * dvs"
        );
    }

    /// Softmax heads per routing head.
    fn group(&self) -> usize {
        self.ha / self.h
    }
}

/// Layer weights and options.
#[derive(Clone, Copy, Debug)]
pub struct NatslLayer<'a> {
    pub dims: NatslDims,
    /// `[2h, D]`.
    pub w_score: &'a [f64],
    /// `[dvs]`.
    pub gamma_gdn: &'a [f64],
    pub gamma_att: &'a [f64],
    /// Softmax RMSNorm weights `[dks]`.
    pub q_norm_w: Option<&'a [f64]>,
    pub k_norm_w: Option<&'a [f64]>,
    /// GDN in-kernel L2 norm of q and k.
    pub l2norm: bool,
    /// `None` means dk^-1/2 (GDN) and dks^-1/2 (softmax).
    pub gdn_scale: Option<f64>,
    pub att_scale: Option<f64>,
    /// Rounding of the pooled router input (e.g. [`super::round_bf16`]).
    pub round: fn(f64) -> f64,
}

/// One token's inputs, already projected: x `[D]`, q, k `[h*dk]`, v `[h*dv]`,
/// g, beta `[h]`, w `[ha, 2]`, z `[ha*dvs]`.
#[derive(Clone, Copy, Debug)]
pub struct TokenInputs<'a> {
    pub x: &'a [f64],
    pub q: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    pub g: &'a [f64],
    pub beta: &'a [f64],
    pub w: &'a [f64],
    pub z: &'a [f64],
}

/// A packed batch of token inputs, each field `[T, ...]` with the per-token layout of
/// [`TokenInputs`].
#[derive(Clone, Copy, Debug)]
pub struct LayerInputs<'a> {
    pub x: &'a [f64],
    pub q: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    pub g: &'a [f64],
    pub beta: &'a [f64],
    pub w: &'a [f64],
    pub z: &'a [f64],
}

impl<'a> LayerInputs<'a> {
    /// Number of tokens (checks every field against `dims`).
    pub fn len(&self, dims: &NatslDims) -> usize {
        let t = self.g.len() / dims.h;
        assert_eq!(self.x.len(), t * dims.d_model, "x must be [T, D]");
        assert_eq!(self.q.len(), t * dims.h * dims.dk, "q must be [T, h*dk]");
        assert_eq!(self.k.len(), t * dims.h * dims.dk, "k must be [T, h*dk]");
        assert_eq!(self.v.len(), t * dims.h * dims.dv, "v must be [T, h*dv]");
        assert_eq!(self.g.len(), t * dims.h, "g must be [T, h]");
        assert_eq!(self.beta.len(), t * dims.h, "beta must be [T, h]");
        assert_eq!(self.w.len(), t * dims.ha * 2, "w must be [T, ha, 2]");
        assert_eq!(
            self.z.len(),
            t * dims.ha * dims.dvs,
            "z must be [T, ha*dvs]"
        );
        t
    }

    pub fn is_empty(&self) -> bool {
        self.g.is_empty()
    }

    /// The inputs of token `t`.
    pub fn token(&self, t: usize, dims: &NatslDims) -> TokenInputs<'a> {
        let row = |x: &'a [f64], w: usize| &x[t * w..(t + 1) * w];
        TokenInputs {
            x: row(self.x, dims.d_model),
            q: row(self.q, dims.h * dims.dk),
            k: row(self.k, dims.h * dims.dk),
            v: row(self.v, dims.h * dims.dv),
            g: row(self.g, dims.h),
            beta: row(self.beta, dims.h),
            w: row(self.w, dims.ha * 2),
            z: row(self.z, dims.ha * dims.dvs),
        }
    }
}

/// Per-sequence decode cache.
#[derive(Clone, Debug, PartialEq)]
pub struct NatslCache {
    /// Tokens seen so far.
    pub pos: usize,
    /// `[h, dk, dv]`: S_c at the start of the current chunk.
    pub state_committed: Vec<f64>,
    /// `[h, dk, dv]`: the recurrence over the current chunk's tokens from S_c.
    pub state_running: Vec<f64>,
    /// `[h]`: sum of g over the current chunk.
    pub gsum_running: Vec<f64>,
    /// `[complete chunks, h]`: labels of the chunks completed so far.
    pub labels: Vec<u8>,
    /// Per routing head r: kept K rows (GDN head r's dk-wide k slice), `[kept tokens, dk]`,
    /// whole 64-token pages of ATTN chunks in chunk order.
    pub kept_k: Vec<Vec<f64>>,
    /// Per routing head r: kept V rows, `[kept tokens, dv]`.
    pub kept_v: Vec<Vec<f64>>,
    /// Current chunk's raw K rows `[pos % 64, h*dk]` (the scratch page).
    pub cur_k: Vec<f64>,
    /// Current chunk's raw V rows `[pos % 64, h*dv]`.
    pub cur_v: Vec<f64>,
    /// Router's running sum of x over the current chunk, `[D]`.
    pub x_sum: Vec<f64>,
}

impl NatslCache {
    /// The cache of an empty sequence (zero state).
    pub fn new(dims: &NatslDims) -> Self {
        let sd = dims.h * dims.dk * dims.dv;
        NatslCache {
            pos: 0,
            state_committed: vec![0.0; sd],
            state_running: vec![0.0; sd],
            gsum_running: vec![0.0; dims.h],
            labels: Vec::new(),
            kept_k: vec![Vec::new(); dims.h],
            kept_v: vec![Vec::new(); dims.h],
            cur_k: Vec::new(),
            cur_v: Vec::new(),
            x_sum: vec![0.0; dims.d_model],
        }
    }
}

/// Outputs of [`layer_prefill`].
#[derive(Clone, Debug)]
pub struct LayerPrefillOutput {
    /// `[T, ha*dvs]`.
    pub out: Vec<f64>,
    pub router: RouterOutput,
    pub gdn: GdnOutput,
    /// One cache per sequence, ready for [`decode_step`].
    pub caches: Vec<NatslCache>,
}

/// Whole-layer prefill over a packed batch: argmax router -> labels -> GDN with labels ->
/// sparse softmax with labels -> merge.
pub fn layer_prefill(
    layer: &NatslLayer,
    inp: &LayerInputs,
    cu_seqlens: &[i32],
) -> LayerPrefillOutput {
    layer_prefill_with(layer, inp, cu_seqlens, RouterPolicy::Argmax)
}

/// [`layer_prefill`] with the router's `policy` (a top-k budget instead of the model's
/// argmax).
pub fn layer_prefill_with(
    layer: &NatslLayer,
    inp: &LayerInputs,
    cu_seqlens: &[i32],
    policy: RouterPolicy,
) -> LayerPrefillOutput {
    let d = layer.dims;
    d.check();
    let router = router(
        inp.x,
        layer.w_score,
        cu_seqlens,
        d.d_model,
        d.h,
        policy,
        layer.round,
    );
    let b = layer_branches(layer, inp, cu_seqlens, &router.labels);
    let caches = (0..n_seqs(cu_seqlens))
        .map(|s| prefill_cache(&d, inp, cu_seqlens, s, &router, &b.gdn))
        .collect();
    LayerPrefillOutput {
        out: b.out,
        router,
        gdn: b.gdn,
        caches,
    }
}

/// The two branches and the merge of a layer prefill.
#[derive(Clone, Debug)]
pub struct LayerBranches {
    /// `[T, ha*dvs]`: the layer output (before o_proj).
    pub out: Vec<f64>,
    pub gdn: GdnOutput,
    /// The softmax branch, `[T, ha, dvs]`.
    pub att: AttnOutput,
}

/// Everything after the router for given chunk `labels` (`[num_slots, h]`, e.g. a
/// device router's, so that a check of the rest is not thrown off by near-tie flips):
/// GDN with the labels' chunk commit, the sparse softmax over the ATTN chunks, merge.
pub fn layer_branches(
    layer: &NatslLayer,
    inp: &LayerInputs,
    cu_seqlens: &[i32],
    labels: &[u8],
) -> LayerBranches {
    let d = layer.dims;
    d.check();
    let t_total = inp.len(&d);
    assert_eq!(
        t_total,
        *cu_seqlens.last().unwrap() as usize,
        "inputs must have cu[N] tokens"
    );
    let gdn = gdn_recurrent(&GdnProblem {
        q: inp.q,
        k: inp.k,
        v: inp.v,
        g: inp.g,
        beta: inp.beta,
        cu_seqlens,
        hqk: d.h,
        hv: d.h,
        dk: d.dk,
        dv: d.dv,
        labels: Some((labels, d.h)),
        h0: None,
        scale: layer.gdn_scale,
        l2norm: layer.l2norm,
    });
    let att = sparse_attention(
        &AttnProblem {
            q: inp.q,
            k: inp.k,
            v: inp.v,
            cu_seqlens,
            hq: d.ha,
            hkv: d.ha,
            dk: d.dks,
            dv: d.dvs,
            scale: layer.att_scale,
            q_norm_w: layer.q_norm_w,
            k_norm_w: layer.k_norm_w,
        },
        labels,
        d.h,
    );
    let out = merge(
        &gdn.o,
        &att.o,
        inp.w,
        layer.gamma_gdn,
        layer.gamma_att,
        inp.z,
        d.ha,
        d.dvs,
    );
    LayerBranches { out, gdn, att }
}

/// Builds sequence `s`'s decode cache from the prefill results.
fn prefill_cache(
    d: &NatslDims,
    inp: &LayerInputs,
    cu_seqlens: &[i32],
    s: usize,
    router: &RouterOutput,
    gdn: &GdnOutput,
) -> NatslCache {
    let range = seq_range(cu_seqlens, s);
    let (hk, hvw) = (d.h * d.dk, d.h * d.dv);
    let sd = d.h * d.dk * d.dv;
    let base = slot_base(cu_seqlens, s);
    let complete = range.len() / CHUNK;
    let mut cache = NatslCache::new(d);
    cache.pos = range.len();
    cache.state_committed = gdn.state_committed[s * sd..(s + 1) * sd].to_vec();
    cache.state_running = gdn.state_running[s * sd..(s + 1) * sd].to_vec();
    cache.gsum_running = gdn.gsum_running[s * d.h..(s + 1) * d.h].to_vec();
    cache.labels = router.labels[base * d.h..(base + complete) * d.h].to_vec();
    for c in 0..complete {
        for r in 0..d.h {
            if cache.labels[c * d.h + r] == LABEL_ATTN {
                for t in range.start + c * CHUNK..range.start + (c + 1) * CHUNK {
                    cache.kept_k[r]
                        .extend_from_slice(&inp.k[t * hk + r * d.dk..t * hk + (r + 1) * d.dk]);
                    cache.kept_v[r]
                        .extend_from_slice(&inp.v[t * hvw + r * d.dv..t * hvw + (r + 1) * d.dv]);
                }
            }
        }
    }
    let cur = range.start + complete * CHUNK..range.end;
    cache.cur_k = inp.k[cur.start * hk..cur.end * hk].to_vec();
    cache.cur_v = inp.v[cur.start * hvw..cur.end * hvw].to_vec();
    for t in cur {
        for (acc, x) in cache
            .x_sum
            .iter_mut()
            .zip(&inp.x[t * d.d_model..(t + 1) * d.d_model])
        {
            *acc += x;
        }
    }
    cache
}

/// One decode step for one sequence; returns out `[ha*dvs]`.
pub fn decode_step(layer: &NatslLayer, cache: &mut NatslCache, tok: &TokenInputs) -> Vec<f64> {
    let d = layer.dims;
    d.check();
    let (hk, hvw, g) = (d.h * d.dk, d.h * d.dv, d.group());
    assert_eq!(tok.x.len(), d.d_model, "x must be [D]");
    assert_eq!(tok.q.len(), hk, "q must be [h*dk]");
    assert_eq!(tok.k.len(), hk, "k must be [h*dk]");
    assert_eq!(tok.v.len(), hvw, "v must be [h*dv]");
    assert_eq!(tok.g.len(), d.h, "g must be [h]");
    assert_eq!(tok.beta.len(), d.h, "beta must be [h]");
    assert_eq!(tok.w.len(), d.ha * 2, "w must be [ha, 2]");
    assert_eq!(tok.z.len(), d.ha * d.dvs, "z must be [ha*dvs]");

    cache.cur_k.extend_from_slice(tok.k);
    cache.cur_v.extend_from_slice(tok.v);
    for (acc, x) in cache.x_sum.iter_mut().zip(tok.x) {
        *acc += x;
    }
    cache.pos += 1;

    // 1. Softmax over the kept pages plus the current chunk (new token included).
    let att_scale = layer.att_scale.unwrap_or(1.0 / (d.dks as f64).sqrt());
    let mut o_att = Vec::with_capacity(d.ha * d.dvs);
    for j in 0..d.ha {
        let r = j / g;
        let (ko, vo) = ((j % g) * d.dks, (j % g) * d.dvs);
        let mut keys: Vec<Vec<f64>> = Vec::new();
        let mut values: Vec<&[f64]> = Vec::new();
        let kept = cache.kept_k[r].len() / d.dk;
        for t in 0..kept {
            keys.push(cache.kept_k[r][t * d.dk + ko..t * d.dk + ko + d.dks].to_vec());
            values.push(&cache.kept_v[r][t * d.dv + vo..t * d.dv + vo + d.dvs]);
        }
        for t in 0..cache.cur_k.len() / hk {
            keys.push(cache.cur_k[t * hk + j * d.dks..t * hk + (j + 1) * d.dks].to_vec());
            values.push(&cache.cur_v[t * hvw + j * d.dvs..t * hvw + (j + 1) * d.dvs]);
        }
        let norm = |x: &[f64], w: Option<&[f64]>| match w {
            Some(w) => rms_normalize(x, Some(w)),
            None => x.to_vec(),
        };
        let keys: Vec<Vec<f64>> = keys.iter().map(|k| norm(k, layer.k_norm_w)).collect();
        let key_refs: Vec<&[f64]> = keys.iter().map(Vec::as_slice).collect();
        let q = norm(&tok.q[j * d.dks..(j + 1) * d.dks], layer.q_norm_w);
        o_att.extend(softmax_attend(&q, &key_refs, &values, att_scale).0);
    }

    // 2. One GDN step per head on the running state.
    let sd = d.dk * d.dv;
    let mut o_gdn = Vec::with_capacity(hvw);
    for i in 0..d.h {
        o_gdn.extend(gdn_decode_step(
            &mut cache.state_running[i * sd..(i + 1) * sd],
            &tok.q[i * d.dk..(i + 1) * d.dk],
            &tok.k[i * d.dk..(i + 1) * d.dk],
            &tok.v[i * d.dv..(i + 1) * d.dv],
            tok.g[i],
            tok.beta[i],
            layer.gdn_scale,
            layer.l2norm,
        ));
        cache.gsum_running[i] += tok.g[i];
    }

    // 3. Merge.
    let out = merge(
        &o_gdn,
        &o_att,
        tok.w,
        layer.gamma_gdn,
        layer.gamma_att,
        tok.z,
        d.ha,
        d.dvs,
    );

    // 4. Chunk complete: score it and commit.
    if cache.pos.is_multiple_of(CHUNK) {
        finish_chunk(layer, cache);
    }
    out
}

/// Decode one token for each sequence of a batch (each at its own position);
/// returns out `[N, ha*dvs]`.
pub fn decode_batch(
    layer: &NatslLayer,
    caches: &mut [NatslCache],
    toks: &[TokenInputs],
) -> Vec<f64> {
    assert_eq!(caches.len(), toks.len(), "one token per cache");
    caches
        .iter_mut()
        .zip(toks)
        .flat_map(|(c, t)| decode_step(layer, c, t))
        .collect()
}

fn finish_chunk(layer: &NatslLayer, cache: &mut NatslCache) {
    let d = layer.dims;
    let (hk, hvw, sd) = (d.h * d.dk, d.h * d.dv, d.dk * d.dv);
    // Same operations as the prefill router: sum in token order, divide, round.
    let m: Vec<f64> = cache
        .x_sum
        .iter()
        .map(|s| (layer.round)(s / CHUNK as f64))
        .collect();
    let logits = score_chunk(&m, layer.w_score, d.h);
    for r in 0..d.h {
        let st = r * sd..(r + 1) * sd;
        if logits[2 * r] >= logits[2 * r + 1] {
            cache.labels.push(LABEL_ATTN);
            for t in 0..CHUNK {
                cache.kept_k[r]
                    .extend_from_slice(&cache.cur_k[t * hk + r * d.dk..t * hk + (r + 1) * d.dk]);
                cache.kept_v[r]
                    .extend_from_slice(&cache.cur_v[t * hvw + r * d.dv..t * hvw + (r + 1) * d.dv]);
            }
            let decay = cache.gsum_running[r].exp();
            cache.state_committed[st]
                .iter_mut()
                .for_each(|x| *x *= decay);
        } else {
            cache.labels.push(LABEL_GDN);
            cache.state_committed[st.clone()].copy_from_slice(&cache.state_running[st]);
        }
    }
    cache.state_running = cache.state_committed.clone();
    cache.gsum_running.iter_mut().for_each(|x| *x = 0.0);
    cache.cur_k.clear();
    cache.cur_v.clear();
    cache.x_sum.iter_mut().for_each(|x| *x = 0.0);
}
