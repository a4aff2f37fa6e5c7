//! Sparse softmax timings: dense causal (every chunk ATTN) and routed NAtS-L shapes
//! (prefill, every prefill kernel of the device), and paged decode at 32k context.
//! TFLOP/s count 2 * (dk + dv) per visible pair; decode TB/s count the selected KV
//! bytes. Used by `cargo bench --bench sparse` and `natsl bench sparse`. Panics on a
//! device error (a benchmark tool, not API).

use half::bf16;
use super::{fill, time_it, Record};
use crate::ops::sparse::{self, BlockMask, DecodeWorkspace, PagedKv, PrefillKernel, SparseOptions};
use crate::reference as r;
use crate::{testing, Batch, Runtime, TensorMut, TensorRef};
use rand::seq::SliceRandom;
use rand::SeedableRng;


struct Prefill {
    name: String,
    lens: Vec<usize>,
    hq: usize,
    hkv: usize,
    hr: usize,
    dk: usize,
    dv: usize,
    frac: f64,
}

fn bench_prefill(rt: &Runtime, s: &Prefill, kernel: PrefillKernel) -> Record {
    let cu = testing::cu_seqlens(&s.lens);
    let t = *cu.last().unwrap() as usize;
    let n = s.lens.len();
    let (hq, hkv, hr, dk, dv) = (s.hq, s.hkv, s.hr, s.dk, s.dv);
    let batch = Batch::new(rt, &cu).unwrap();
    let q = fill::<bf16>(rt, t * hq * dk, -1.0, 1.0, 1);
    let k = fill::<bf16>(rt, t * hkv * dk, -1.0, 1.0, 2);
    let v = fill::<bf16>(rt, t * hkv * dv, -1.0, 1.0, 3);
    let mut o = rt.stream().alloc_zeros::<bf16>(t * hq * dv).unwrap();
    // Labels: exactly round(frac * complete) ATTN chunks per (sequence, head), at random.
    let ns = r::num_slots(t, n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut labels = vec![r::LABEL_GDN; ns * hr];
    let mut pairs = 0f64;
    for si in 0..n {
        let base = r::slot_base(&cu, si);
        let complete = s.lens[si] / 64;
        for h in 0..hr {
            let mut idx: Vec<usize> = (0..complete).collect();
            idx.shuffle(&mut rng);
            for &c in idx.iter().take((s.frac * complete as f64).round() as usize) {
                labels[(base + c) * hr + h] = r::LABEL_ATTN;
            }
            // Visible pairs of this routing head's query heads.
            let mut before = 0usize;
            for c in 0..r::n_chunks(s.lens[si]) {
                let rows = (s.lens[si] - c * 64).min(64);
                pairs += (hq / hr) as f64 * (rows * before * 64 + rows * (rows + 1) / 2) as f64;
                if labels[(base + c) * hr + h] == r::LABEL_ATTN {
                    before += 1;
                }
            }
        }
    }
    let (list, count) = r::attn_list_from_labels(&labels, &cu, hr);
    let ld = rt.stream().clone_htod(&list).unwrap();
    let cd = rt.stream().clone_htod(&count).unwrap();
    let mask = BlockMask::Routed { attn_list: TensorRef::new(&ld, &[hr, ns]), attn_count: TensorRef::new(&cd, &[n, hr]) };
    let opts = SparseOptions { kernel, ..Default::default() };
    let (qv, kv, vv) = (TensorRef::new(&q, &[t, hq, dk]), TensorRef::new(&k, &[t, hkv, dk]), TensorRef::new(&v, &[t, hkv, dv]));
    let mut ov = TensorMut::new(&mut o, &[t, hq, dv]);
    let timing = time_it(rt, 3, 10, |_| sparse::prefill(rt, &batch, &qv, &kv, &vv, &mask, &opts, &mut ov, None)).unwrap();
    let flops = pairs * 2.0 * (dk + dv) as f64;
    let bytes = 2.0 * (t * hq * dk + t * hkv * (dk + dv) + t * hq * dv) as f64;
    let rec = Record::new(rt, "sparse_prefill", s.name.clone(), format!("{:?} {kernel:?} frac {}", rt.arch(), s.frac), &timing, flops, bytes);
    println!("{:<40} {:<28} {:>9.4} ms {:>7.1} TFLOP/s {:>5.1}% of {:.0}", rec.shape, rec.variant, rec.ms, rec.tflops, 100.0 * rec.tflops / rec.peak_tflops, rec.peak_tflops);
    rec
}

struct Decode {
    name: String,
    batch: usize,
    ctx: usize,
    frac: f64,
}

// NAtS-L 340M softmax heads: 12 q = 12 kv heads, 6 routing heads, 64/128.
fn bench_decode(rt: &Runtime, s: &Decode) -> Record {
    let (hq, hkv, hr, dk, dv) = (12usize, 12usize, 6usize, 64usize, 128usize);
    let n = s.batch;
    let chunks = s.ctx.div_ceil(64); // the last one is the current page
    let np = n * chunks;
    let kp = fill::<bf16>(rt, np * 64 * hkv * dk, -1.0, 1.0, 11);
    let vp = fill::<bf16>(rt, np * 64 * hkv * dv, -1.0, 1.0, 12);
    let q = fill::<bf16>(rt, n * hq * dk, -1.0, 1.0, 13);
    let mut o = rt.stream().alloc_zeros::<bf16>(n * hq * dv).unwrap();
    let max_pages = chunks - 1;
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let mut table = vec![0i32; n * hr * max_pages];
    let mut count = vec![0i32; n * hr];
    let mut pages_read = 0usize;
    for si in 0..n {
        for h in 0..hr {
            let mut idx: Vec<usize> = (0..max_pages).collect();
            idx.shuffle(&mut rng);
            let keep = (s.frac * max_pages as f64).round() as usize;
            let mut kept: Vec<i32> = idx[..keep].iter().map(|&c| (si * chunks + c) as i32).collect();
            kept.sort();
            table[(si * hr + h) * max_pages..][..keep].copy_from_slice(&kept);
            count[si * hr + h] = keep as i32;
            pages_read += (keep + 1) * (hkv / hr);
        }
    }
    let cur_page: Vec<i32> = (0..n).map(|si| (si * chunks + chunks - 1) as i32).collect();
    let cur_len = vec![(s.ctx - (chunks - 1) * 64) as i32; n];
    let up = |x: &[i32]| rt.stream().clone_htod(x).unwrap();
    let (td, cd, cpd, cld) = (up(&table), up(&count), up(&cur_page), up(&cur_len));
    let kv = PagedKv {
        k_pages: TensorRef::new(&kp, &[np, 64, hkv, dk]),
        v_pages: TensorRef::new(&vp, &[np, 64, hkv, dv]),
        page_table: TensorRef::new(&td, &[n, hr, max_pages]),
        page_count: TensorRef::new(&cd, &[n, hr]),
        cur_page: TensorRef::new(&cpd, &[n]),
        cur_len: TensorRef::new(&cld, &[n]),
    };
    let opts = SparseOptions::default();
    let qv = TensorRef::new(&q, &[n, hq, dk]);
    let mut ov = TensorMut::new(&mut o, &[n, hq, dv]);
    let mut ws = DecodeWorkspace::new();
    let timing = time_it(rt, 5, 20, |_| sparse::decode(rt, &qv, 1, &kv, &opts, &mut ov, None, &mut ws)).unwrap();
    let bytes = pages_read as f64 * 64.0 * (dk + dv) as f64 * 2.0;
    let flops = pages_read as f64 * 64.0 * (hq / hkv) as f64 * 2.0 * (dk + dv) as f64;
    let rec = Record::new(rt, "sparse_decode", s.name.clone(), format!("{:?} frac {}", rt.arch(), s.frac), &timing, flops, bytes);
    println!("{:<40} {:>9.4} ms {:>7.3} TB/s over {:.1} MB of selected KV", rec.shape, rec.ms, rec.tbps, bytes / 1e6);
    rec
}

/// Every shape whose name contains one of `filters` (all if empty).
pub fn run(rt: &Runtime, filters: &[String]) -> Vec<Record> {
    let want = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let mut pre = vec![Prefill { name: "prefill dense causal B8 H16 T8192 d128".into(), lens: vec![8192; 8], hq: 16, hkv: 16, hr: 16, dk: 128, dv: 128, frac: 1.0 }];
    for f in [1.0, 0.4, 0.3, 0.25, 0.1] {
        pre.push(Prefill { name: format!("prefill natsl 12h 64/128 T32768 rho {f}"), lens: vec![32768], hq: 12, hkv: 12, hr: 6, dk: 64, dv: 128, frac: f });
    }
    // Length sweep at natsl-340M's softmax heads, rho 0.25, the default kernel only: what
    // the PNG draws (the peers' script has the same shapes).
    let sweep: Vec<Prefill> = [4096usize, 8192, 16384, 32768, 65536].iter().map(|&t| Prefill { name: format!("prefill natsl 12h 64/128 T{t} rho 0.25 sweep"), lens: vec![t], hq: 12, hkv: 12, hr: 6, dk: 64, dv: 128, frac: 0.25 }).collect();
    let mut dec = Vec::new();
    for b in [1, 32] {
        for f in [1.0, 0.3] {
            dec.push(Decode { name: format!("decode natsl B{b} ctx32768 rho {f}"), batch: b, ctx: 32768, frac: f });
        }
    }
    let mut recs = Vec::new();
    for s in &pre {
        if want(&s.name) {
            // Every prefill kernel the device has (mma.sync; wgmma, pipelined wgmma and
            // the four warp-specialized schedules on sm_90a).
            // NATSL_BENCH_KERNELS=Wgmma,WarpSpecialized (names as printed): only those.
            let only = std::env::var("NATSL_BENCH_KERNELS").ok();
            for kernel in sparse::prefill_kernels(rt) {
                if only.as_ref().is_some_and(|o| !o.split(',').any(|k| k == format!("{kernel:?}"))) {
                    continue;
                }
                recs.push(bench_prefill(rt, s, kernel));
            }
        }
    }
    for s in &sweep {
        if want(&s.name) {
            recs.push(bench_prefill(rt, s, PrefillKernel::Auto));
        }
    }
    for s in &dec {
        if want(&s.name) {
            recs.push(bench_decode(rt, s));
        }
    }
    recs
}
