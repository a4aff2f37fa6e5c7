//! Layer prefill timings (`layer::prefill`: router -> GDN || sparse softmax -> merge) at
//! natsl-340M dims with the router's top-k budget (KeepFraction 0.3), graph replays timed
//! with CUDA events: the call on two streams (the default) and on one, and beside them
//! each op of the call timed alone on the same inputs (their sum is what no overlap
//! gives). TFLOP/s count the GDN chunk scan's and the visible softmax pairs' FLOPs.
//! Used by `cargo bench --bench layer` and `natsl bench layer`. Panics on a device
//! error (a benchmark tool, not API).

use super::{fill, time_it, Record};
use crate::layer::{self, PrefillInputs, PrefillOptions, PrefillOutputs, PrefillWorkspace, Streams};
use crate::ops::gdn::{self, GdnOptions, GdnPrefillInputs, GdnPrefillOutputs, GdnWorkspace};
use crate::ops::merge::{self, MergeInputs};
use crate::ops::router::{self, RouterOptions, RouterOutput, RouterPolicy};
use crate::ops::sparse::{self, BlockMask, SparseOptions};
use crate::reference as r;
use crate::{Batch, Runtime, TensorMut, TensorRef};
use half::bf16;

/// natsl-340M: D, GDN heads (= routing heads), GDN dk / dv, softmax heads.
const D: usize = 1024;
const H: usize = 6;
const DK: usize = 128;
const DV: usize = 256;
const HA: usize = 12;
const DKS: usize = H * DK / HA;
const DVS: usize = H * DV / HA;
/// The ATTN budget: keep 30% of each sequence's complete chunks per routing head.
const RHO: f32 = 0.3;

/// (name, sequence lengths).
fn shapes() -> Vec<(String, Vec<usize>)> {
    vec![
        ("340M T=4096".into(), vec![4096]),
        ("340M T=32768".into(), vec![32768]),
        ("340M B8 x 4096".into(), vec![4096; 8]),
        ("340M T=131072".into(), vec![131072]),
    ]
}

/// Every shape whose name contains a filter (all if none).
pub fn run(rt: &Runtime, filters: &[String]) -> Vec<Record> {
    let mut out = Vec::new();
    for (name, lens) in shapes() {
        if filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())) {
            bench_shape(rt, &name, &lens, &mut out);
        }
    }
    out
}

fn bench_shape(rt: &Runtime, name: &str, lens: &[usize], out: &mut Vec<Record>) {
    let cu: Vec<i32> = crate::testing::cu_seqlens(lens);
    let t = *cu.last().unwrap() as usize;
    let n = lens.len();
    let batch = Batch::new(rt, &cu).expect("batch");
    let ns = batch.num_slots();
    // The packed projection output q | k | v | z per token, as an engine hands it over.
    let row = 2 * H * DK + H * DV + HA * DVS;
    let proj = fill::<bf16>(rt, t * row, -1.0, 1.0, 1);
    let x = fill::<bf16>(rt, t * D, -1.0, 1.0, 2);
    let w_score = fill::<bf16>(rt, 2 * H * D, -0.05, 0.05, 3);
    let g = fill::<f32>(rt, t * H, -0.2, -0.005, 4);
    let beta = fill::<f32>(rt, t * H, 0.05, 0.95, 5);
    let w = fill::<f32>(rt, t * HA * 2, -2.0, 2.0, 6);
    let gamma_gdn = fill::<bf16>(rt, DVS, 0.5, 1.5, 7);
    let gamma_att = fill::<bf16>(rt, DVS, 0.5, 1.5, 8);
    let mut o = rt.stream().alloc_zeros::<bf16>(t * HA * DVS).expect("alloc out");
    let at = |off: usize, shape: &[usize], strides: &[usize]| {
        let v = TensorRef::strided(&proj, &[t * row], &[1]);
        // SAFETY: a view inside `proj` (offset + extent within t * row), which outlives the calls.
        unsafe { TensorRef::from_raw(v.ptr() + 2 * off as u64, t * row - off, v.dtype(), shape, strides) }
    };
    let inp = PrefillInputs {
        q: at(0, &[t, H, DK], &[row, DK, 1]),
        k: at(H * DK, &[t, H, DK], &[row, DK, 1]),
        v: at(2 * H * DK, &[t, H, DV], &[row, DV, 1]),
        g: TensorRef::new(&g, &[t, H]),
        beta: TensorRef::new(&beta, &[t, H]),
        x: TensorRef::new(&x, &[t, D]),
        w_score: TensorRef::new(&w_score, &[2 * H, D]),
        w: TensorRef::new(&w, &[t, HA, 2]),
        gamma_gdn: TensorRef::new(&gamma_gdn, &[DVS]),
        gamma_att: TensorRef::new(&gamma_att, &[DVS]),
        z: at(2 * H * DK + H * DV, &[t, HA, DVS], &[row, DVS, 1]),
    };
    let ropts = RouterOptions { policy: RouterPolicy::KeepFraction(RHO), ..Default::default() };

    // The parts alone, on the router's labels and lists.
    let mut rout = RouterOutput::alloc(rt, &batch, H, D, false).expect("router outputs");
    let route = |rout: &mut RouterOutput| router::route_into(rt, &batch, &inp.x, &inp.w_score, &ropts, rout);
    route(&mut rout).expect("router");
    let labels: Vec<u8> = rt.stream().clone_dtoh(&rout.labels).expect("labels");
    let (flops_gdn, flops_att) = flops(&cu, &labels, t);
    let bytes_in = 2.0 * (t * (2 * H * DK + H * DV + HA * DVS + D)) as f64 + 4.0 * (t * (2 * H + 2 * HA)) as f64;
    let bytes_out = 2.0 * (t * HA * DVS) as f64;
    let mut timed = |variant: &str, flops: f64, bytes: f64, tm: super::Timing| {
        let rec = Record::new(rt, "layer_prefill", name.to_string(), variant.to_string(), &tm, flops, bytes);
        println!("{:<24} {:<28} {:>9.4} ms {:>7.1} TFLOP/s {:>6.3} TB/s", rec.shape, rec.variant, rec.ms, rec.tflops, rec.tbps);
        out.push(rec);
        tm.median_ms
    };
    let tm = time_it(rt, 3, 20, |_| route(&mut rout)).expect("router");
    let mut parts = timed("part: router", 0.0, 2.0 * (t * D) as f64, tm);

    let mut og = rt.stream().alloc_zeros::<bf16>(t * H * DV).expect("alloc o_gdn");
    let mut oa = rt.stream().alloc_zeros::<bf16>(t * HA * DVS).expect("alloc o_att");
    let gin = GdnPrefillInputs { q: inp.q.clone(), k: inp.k.clone(), v: inp.v.clone(), g: inp.g.clone(), beta: inp.beta.clone(), labels: Some(TensorRef::new(&rout.labels, &[ns, H])), h0: None };
    let gopts = GdnOptions { scale: None, l2norm: true };
    let mut gws = GdnWorkspace::new();
    {
        let mut gout = GdnPrefillOutputs { o: TensorMut::new(&mut og, &[t, H, DV]), committed: None, running: None, gsum_running: None };
        let tm = time_it(rt, 2, 10, |_| gdn::gdn_prefill(rt, &batch, &gin, &mut gout, &gopts, &mut gws)).expect("gdn");
        parts += timed("part: gdn prefill", flops_gdn, 2.0 * (t * H * (2 * DK + 2 * DV)) as f64, tm);
    }
    {
        let qs = at(0, &[t, HA, DKS], &[row, DKS, 1]);
        let ks = at(H * DK, &[t, HA, DKS], &[row, DKS, 1]);
        let vs = at(2 * H * DK, &[t, HA, DVS], &[row, DVS, 1]);
        let mask = BlockMask::Routed { attn_list: TensorRef::new(&rout.attn_list, &[H, ns]), attn_count: TensorRef::new(&rout.attn_count, &[n, H]) };
        let sopts = SparseOptions::default();
        let mut ov = TensorMut::new(&mut oa, &[t, HA, DVS]);
        let tm = time_it(rt, 2, 10, |_| sparse::prefill(rt, &batch, &qs, &ks, &vs, &mask, &sopts, &mut ov, None)).expect("sparse");
        parts += timed("part: sparse prefill", flops_att, 2.0 * (t * HA * (2 * DKS + 2 * DVS)) as f64, tm);
    }
    {
        let m = MergeInputs { o_gdn: TensorRef::strided(&og, &[t, HA, DVS], &[H * DV, DVS, 1]), o_att: TensorRef::new(&oa, &[t, HA, DVS]), w: inp.w.clone(), gamma_gdn: inp.gamma_gdn.clone(), gamma_att: inp.gamma_att.clone(), z: inp.z.clone() };
        let mut ov = TensorMut::new(&mut o, &[t, HA, DVS]);
        let tm = time_it(rt, 3, 20, |_| merge::merge(rt, &m, &mut ov)).expect("merge");
        parts += timed("part: merge", 0.0, 2.0 * (4 * t * HA * DVS) as f64 + 8.0 * (t * HA) as f64, tm);
    }
    drop((og, oa, gws));

    // The layer call, router outputs in its workspace, both stream modes.
    let mut ws = PrefillWorkspace::new();
    let mut lms = [0.0; 2];
    for (i, streams) in [Streams::Two, Streams::One].into_iter().enumerate() {
        let opts = PrefillOptions { router: ropts, streams, ..Default::default() };
        let mut lout = PrefillOutputs::new(TensorMut::new(&mut o, &[t, HA, DVS]));
        let tm = time_it(rt, 2, 10, |_| layer::prefill(rt, &batch, &inp, &mut lout, &opts, &mut ws)).expect("layer");
        let variant = format!("layer {streams:?} stream{}", if streams == Streams::Two { "s" } else { "" });
        lms[i] = timed(&variant, flops_gdn + flops_att, bytes_in + bytes_out, tm);
    }
    println!("{name}: parts alone sum to {parts:.4} ms; the layer call takes {:.4} ms on two streams ({:.2}x the sum), {:.4} ms on one", lms[0], lms[0] / parts, lms[1]);
}

/// (GDN FLOPs, sparse softmax FLOPs): the chunk scan's count used by `natsl run`, and
/// 2 (dks + dvs) per visible (query, key) pair of every softmax head.
fn flops(cu: &[i32], labels: &[u8], t: usize) -> (f64, f64) {
    let gdn = (t * H) as f64 * (6.0 * (DK * DV) as f64 + 256.0 * (DK + DV) as f64);
    let mut pairs = 0.0;
    for s in 0..cu.len() - 1 {
        let len = (cu[s + 1] - cu[s]) as usize;
        let base = r::slot_base(cu, s);
        for h in 0..H {
            let mut before = 0usize;
            for c in 0..r::n_chunks(len) {
                let rows = (len - c * 64).min(64);
                pairs += (HA / H) as f64 * (rows * before * 64 + rows * (rows + 1) / 2) as f64;
                before += (labels[(base + c) * H + h] == r::LABEL_ATTN) as usize;
            }
        }
    }
    (gdn, pairs * 2.0 * (DKS + DVS) as f64)
}
