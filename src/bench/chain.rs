//! The NAtS-L layer's prefill as four separate kernels chained the way an engine without
//! a fused layer call runs them (router -> GDN scan with the router's labels -> sparse
//! softmax over the router's lists through strided head views of the same q/k/v ->
//! merge), at natsl-340M and natsl-760M dims, one sequence of 4k..64k tokens: each op
//! alone (`chain <op>`) and the four in one graph (`chain`). Used by `natsl bench chain`
//! (the baseline of a one-call layer prefill). Inputs are synthetic.

use super::{fill, time_it, Record};
use crate::error::Result;
use crate::ops::gdn::{gdn_prefill, GdnOptions, GdnPrefillInputs, GdnPrefillOutputs, GdnWorkspace};
use crate::ops::merge::{self, MergeInputs};
use crate::ops::router::{route_into, RouterOptions, RouterOutput};
use crate::ops::sparse::{self, BlockMask, SparseOptions};
use crate::reference as r;
use crate::tune::run::{Model, MODELS};
use crate::{Batch, Runtime, TensorMut, TensorRef};
use half::bf16;

pub const LENGTHS: &[usize] = &[4096, 8192, 16384, 32768, 65536];

/// (query, key) pairs the sparse softmax visits (kept earlier chunks + own chunk, causal).
fn visible_pairs(cu: &[i32], labels: &[u8], hr: usize, hq: usize) -> f64 {
    let mut pairs = 0.0;
    for n in 0..cu.len() - 1 {
        let len = (cu[n + 1] - cu[n]) as usize;
        let base = r::slot_base(cu, n);
        for h in 0..hr {
            let mut before = 0usize;
            for c in 0..r::n_chunks(len) {
                let rows = (len - c * 64).min(64);
                pairs += (hq / hr) as f64 * (rows * before * 64 + rows * (rows + 1) / 2) as f64;
                before += (labels[(base + c) * hr + h] == r::LABEL_ATTN) as usize;
            }
        }
    }
    pairs
}

fn bench_one(rt: &Runtime, m: &Model, t: usize, out: &mut Vec<Record>) -> Result<()> {
    let cu = vec![0, t as i32];
    let batch = Batch::new(rt, &cu)?;
    let ns = batch.num_slots();
    let (h, dk, dv, ha, dks, dvs, d) = (m.h, m.dk, m.dv, m.ha, m.dks, m.dvs, m.d_model);
    let x = fill::<bf16>(rt, t * d, -1.0, 1.0, 1);
    let w_score = fill::<bf16>(rt, 2 * h * d, -0.05, 0.05, 2);
    let q = fill::<bf16>(rt, t * h * dk, -1.0, 1.0, 3);
    let k = fill::<bf16>(rt, t * h * dk, -1.0, 1.0, 4);
    let v = fill::<bf16>(rt, t * h * dv, -1.0, 1.0, 5);
    let g = fill::<f32>(rt, t * h, -0.1, -0.005, 6);
    let beta = fill::<f32>(rt, t * h, 0.05, 0.95, 7);
    let wm = fill::<f32>(rt, t * ha * 2, -2.0, 2.0, 8);
    let z = fill::<bf16>(rt, t * ha * dvs, -3.0, 3.0, 9);
    let gg = fill::<bf16>(rt, dvs, 0.5, 1.5, 10);
    let ga = fill::<bf16>(rt, dvs, 0.5, 1.5, 11);
    let mut og = rt.stream().alloc_zeros::<bf16>(t * h * dv)?;
    let mut oa = rt.stream().alloc_zeros::<bf16>(t * ha * dvs)?;
    let mut y = rt.stream().alloc_zeros::<bf16>(t * ha * dvs)?;
    let mut rout = RouterOutput::alloc(rt, &batch, h, d, false)?;
    let mut ws = GdnWorkspace::new();
    let (xv, wv) = (TensorRef::new(&x, &[t, d]), TensorRef::new(&w_score, &[2 * h, d]));
    let ropts = RouterOptions::default();
    let gopts = GdnOptions { scale: None, l2norm: true };
    let sopts = SparseOptions::default();
    let qs = TensorRef::strided(&q, &[t, ha, dks], &[h * dk, dks, 1]);
    let ks = TensorRef::strided(&k, &[t, ha, dks], &[h * dk, dks, 1]);
    let vs = TensorRef::strided(&v, &[t, ha, dvs], &[h * dv, dvs, 1]);

    // One call of each op, in order; `which` picks one (None: all four).
    let mut step = |which: Option<usize>, rout: &mut RouterOutput, og: &mut cudarc::driver::CudaSlice<bf16>, oa: &mut cudarc::driver::CudaSlice<bf16>, y: &mut cudarc::driver::CudaSlice<bf16>| -> Result<()> {
        let on = |i: usize| which.is_none_or(|w| w == i);
        if on(0) {
            route_into(rt, &batch, &xv, &wv, &ropts, rout)?;
        }
        if on(1) {
            let inp = GdnPrefillInputs {
                q: TensorRef::new(&q, &[t, h, dk]),
                k: TensorRef::new(&k, &[t, h, dk]),
                v: TensorRef::new(&v, &[t, h, dv]),
                g: TensorRef::new(&g, &[t, h]),
                beta: TensorRef::new(&beta, &[t, h]),
                labels: Some(TensorRef::new(&rout.labels, &[ns, h])),
                h0: None,
            };
            let mut o = GdnPrefillOutputs { o: TensorMut::new(og, &[t, h, dv]), committed: None, running: None, gsum_running: None };
            gdn_prefill(rt, &batch, &inp, &mut o, &gopts, &mut ws)?;
        }
        if on(2) {
            let mask = BlockMask::Routed { attn_list: TensorRef::new(&rout.attn_list, &[h, ns]), attn_count: TensorRef::new(&rout.attn_count, &[1, h]) };
            sparse::prefill(rt, &batch, &qs, &ks, &vs, &mask, &sopts, &mut TensorMut::new(oa, &[t, ha, dvs]), None)?;
        }
        if on(3) {
            let shape = [t, ha, dvs];
            let inp = MergeInputs { o_gdn: TensorRef::new(og, &shape), o_att: TensorRef::new(oa, &shape), w: TensorRef::new(&wm, &[t, ha, 2]), gamma_gdn: TensorRef::new(&gg, &[dvs]), gamma_att: TensorRef::new(&ga, &[dvs]), z: TensorRef::new(&z, &shape) };
            merge::merge(rt, &inp, &mut TensorMut::new(y, &shape))?;
        }
        Ok(())
    };
    step(None, &mut rout, &mut og, &mut oa, &mut y)?;
    rt.synchronize()?;
    let labels: Vec<u8> = rt.stream().clone_dtoh(&rout.labels)?;
    let attn = labels.iter().filter(|&&l| l == r::LABEL_ATTN).count() as f64 / labels.len().max(1) as f64;
    // FLOPs and bytes each op must move (as the family benches count them).
    let costs = [
        (2.0 * (t * d * 2 * h) as f64, (t * d * 2) as f64),
        ((t * h) as f64 * (6.0 * (dk * dv) as f64 + 256.0 * (dk + dv) as f64), (t * h * (2 * dk + 2 * dv) * 2) as f64),
        (visible_pairs(&cu, &labels, h, ha) * 2.0 * (dks + dvs) as f64, (t * ha * (2 * dks + 2 * dvs) * 2) as f64),
        (0.0, (4 * t * ha * dvs * 2 + t * ha * 2 * 4) as f64),
    ];
    let shape = format!("{} chain 1x{t}", m.name);
    let variant = format!("attn {attn:.2}");
    for (i, op) in ["router", "gdn_prefill", "sparse_prefill", "merge"].iter().enumerate() {
        let tm = time_it(rt, 2, 10, |_| step(Some(i), &mut rout, &mut og, &mut oa, &mut y))?;
        out.push(Record::new(rt, &format!("chain {op}"), shape.clone(), variant.clone(), &tm, costs[i].0, costs[i].1));
    }
    let tm = time_it(rt, 2, 10, |_| step(None, &mut rout, &mut og, &mut oa, &mut y))?;
    let (f, b) = costs.iter().fold((0.0, 0.0), |a, c| (a.0 + c.0, a.1 + c.1));
    let rec = Record::new(rt, "chain", shape, variant, &tm, f, b);
    println!("{:<28} {:<10} {:>9.4} ms {:>7.1} TFLOP/s {:>5.1}% of roofline", rec.shape, rec.variant, rec.ms, rec.tflops, 100.0 * rec.roofline_frac);
    out.push(rec);
    Ok(())
}

/// Every (model, length) whose name (`natsl-340M chain 1x4096`) contains a filter (all if none).
pub fn run(rt: &Runtime, filters: &[String]) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for m in &MODELS {
        for &t in LENGTHS {
            let name = format!("{} chain 1x{t}", m.name);
            if filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())) {
                bench_one(rt, m, t, &mut out)?;
            }
        }
    }
    Ok(out)
}
