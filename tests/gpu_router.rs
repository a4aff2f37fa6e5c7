//! Tier 3: the router against the f64 reference on random ragged batches.
//! Skips with `skipped: no CUDA device` when there is no GPU.

use half::{bf16, f16};
use natsl::ops::router::{route, route_into, RouterOptions, RouterOutput, RouterPolicy};
use natsl::reference::{self as r, router as rr};
use natsl::testing::{self, TestElem};
use natsl::{Arch, Batch, Runtime, TensorRef};

struct Case {
    lens: Vec<usize>,
    d: usize,
    hr: usize,
    policy: RouterPolicy,
    compile_time_k: bool,
}

/// Run one case for element type T; returns the number of near-tie label flips.
fn check<T: TestElem + natsl::tensor::Element>(rt: &Runtime, case: &Case, seed: u64, round: fn(f64) -> f64) -> usize {
    let mut rng = testing::rng(seed);
    let cu = testing::cu_seqlens(&case.lens);
    let t = *cu.last().unwrap() as usize;
    let (d, hr) = (case.d, case.hr);
    // An offset per row makes labels data-dependent but not all one way.
    let x = testing::quantize::<T>(&testing::rand_vec(&mut rng, t * d, 1.0));
    let w = testing::quantize::<T>(&testing::rand_vec(&mut rng, 2 * hr * d, 0.05));
    let policy = match case.policy {
        RouterPolicy::Argmax => rr::RouterPolicy::Argmax,
        RouterPolicy::TopK(k) => rr::RouterPolicy::TopK(k),
        RouterPolicy::KeepFraction(f) => rr::RouterPolicy::KeepFraction(f as f64),
    };
    let reference = rr::router(&x, &w, &cu, d, hr, policy, round);

    let batch = Batch::new(rt, &cu).unwrap();
    let xd = testing::upload::<T>(rt, &x).unwrap();
    let wd = testing::upload::<T>(rt, &w).unwrap();
    let mut out = RouterOutput::alloc(rt, &batch, hr, d, true).unwrap();
    let ns = batch.num_slots();
    out.labels = testing::poisoned::<u8>(rt, ns * hr).unwrap();
    out.attn_list = testing::poisoned::<i32>(rt, ns * hr).unwrap();
    out.attn_count = testing::poisoned::<i32>(rt, batch.num_seqs() * hr).unwrap();
    out.logits = Some(testing::poisoned::<f32>(rt, ns * hr * 2).unwrap());
    let opts = RouterOptions { policy: case.policy, round_mean: true, compile_time_k: case.compile_time_k };
    // Twice on the same outputs: the completion counters must be back at zero after a call.
    route_into(rt, &batch, &TensorRef::new(&xd, &[t, d]), &TensorRef::new(&wd, &[2 * hr, d]), &opts, &mut out).unwrap();
    out.labels = testing::poisoned::<u8>(rt, ns * hr).unwrap();
    out.attn_count = testing::poisoned::<i32>(rt, batch.num_seqs() * hr).unwrap();
    route_into(rt, &batch, &TensorRef::new(&xd, &[t, d]), &TensorRef::new(&wd, &[2 * hr, d]), &opts, &mut out).unwrap();
    rt.synchronize().unwrap();

    let labels: Vec<u8> = rt.stream().clone_dtoh(&out.labels).unwrap();
    let list: Vec<i32> = rt.stream().clone_dtoh(&out.attn_list).unwrap();
    let count: Vec<i32> = rt.stream().clone_dtoh(&out.attn_count).unwrap();
    let logits = testing::download(rt, out.logits.as_ref().unwrap()).unwrap();

    // Logits of used slots: f32 sums vs f64 (rounded m_c may differ by one ulp).
    let mut lo = Vec::new();
    let mut lr = Vec::new();
    for n in 0..batch.num_seqs() {
        let base = r::slot_base(&cu, n);
        for c in 0..r::n_chunks(case.lens[n]) {
            for h in 0..hr {
                for j in 0..2 {
                    let i = ((base + c) * hr + h) * 2 + j;
                    lo.push(logits[i]);
                    lr.push(reference.logits[i]);
                }
            }
        }
    }
    testing::assert_close("router logits", &lo, &lr, 2e-3);

    // Labels: exact, except near ties (|margin| within the rounding noise of m_c).
    let mut flips = 0;
    for n in 0..batch.num_seqs() {
        let base = r::slot_base(&cu, n);
        let nch = r::n_chunks(case.lens[n]);
        for h in 0..hr {
            // Margin threshold: the k-th largest margin for top-k, 0 for argmax.
            let complete = case.lens[n] / 64;
            let mut margins: Vec<f64> = (0..complete).map(|c| reference.logits[((base + c) * hr + h) * 2] - reference.logits[((base + c) * hr + h) * 2 + 1]).collect();
            margins.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let k_expected = match policy {
                rr::RouterPolicy::Argmax => None,
                rr::RouterPolicy::TopK(k) => Some(k.min(complete)),
                rr::RouterPolicy::KeepFraction(f) => Some(rr::keep_fraction_k(f, complete).min(complete)),
            };
            let threshold = match k_expected {
                None => 0.0,
                Some(0) => f64::INFINITY,
                Some(k) => margins[k - 1],
            };
            for c in 0..nch {
                let i = (base + c) * hr + h;
                if labels[i] != reference.labels[i] {
                    let m = reference.logits[i * 2] - reference.logits[i * 2 + 1];
                    let noise = 2e-3 * (reference.logits[i * 2].abs() + reference.logits[i * 2 + 1].abs()) + 1e-5;
                    assert!(c < complete && (m - threshold).abs() <= noise, "label mismatch seq {n} head {h} chunk {c}: gpu {} ref {} (margin {m:.3e}, threshold {threshold:.3e})", labels[i], reference.labels[i]);
                    flips += 1;
                }
            }
            let cnt = count[n * hr + h];
            if let Some(k) = k_expected {
                assert_eq!(cnt as usize, k, "top-k count seq {n} head {h}");
            }
        }
    }
    // The list and count must be exactly the GPU labels' ATTN chunks, sorted.
    let gpu_labels_used: Vec<u8> = labels.iter().map(|&l| if l == 0xA5 { 0 } else { l }).collect();
    let (list_expect, count_expect) = rr::attn_list_from_labels(&gpu_labels_used, &cu, hr);
    assert_eq!(count, count_expect, "attn_count vs GPU labels");
    for n in 0..batch.num_seqs() {
        let base = r::slot_base(&cu, n);
        for h in 0..hr {
            let c = count[n * hr + h] as usize;
            let s = h * ns + base;
            assert_eq!(list[s..s + c], list_expect[s..s + c], "attn_list seq {n} head {h}");
        }
    }
    flips
}

fn cases() -> Vec<Case> {
    let ragged = vec![1, 63, 64, 65, 200, 1000, 4113];
    let mut v = Vec::new();
    for &(d, hr) in &[(1024, 6), (1536, 6), (4096, 64), (8192, 16), (104, 3)] {
        v.push(Case { lens: ragged.clone(), d, hr, policy: RouterPolicy::Argmax, compile_time_k: false });
    }
    let long = vec![130, 700, 2048, 5000];
    v.push(Case { lens: long.clone(), d: 1024, hr: 6, policy: RouterPolicy::TopK(2), compile_time_k: false });
    v.push(Case { lens: long.clone(), d: 1024, hr: 6, policy: RouterPolicy::TopK(2), compile_time_k: true });
    v.push(Case { lens: long.clone(), d: 1536, hr: 64, policy: RouterPolicy::KeepFraction(0.3), compile_time_k: false });
    v.push(Case { lens: long.clone(), d: 2048, hr: 6, policy: RouterPolicy::KeepFraction(1.0), compile_time_k: false });
    v.push(Case { lens: long.clone(), d: 1024, hr: 6, policy: RouterPolicy::Argmax, compile_time_k: false });
    v.push(Case { lens: long, d: 4096, hr: 8, policy: RouterPolicy::KeepFraction(0.5), compile_time_k: false });
    // Many chunk slots (with gap slots between sequences) and sequences of > 512 chunks
    // (several block-wide passes of the select).
    v.push(Case { lens: vec![1, 20000, 63, 64, 20001, 130], d: 256, hr: 6, policy: RouterPolicy::Argmax, compile_time_k: false });
    v.push(Case { lens: vec![70, 33000], d: 1024, hr: 6, policy: RouterPolicy::KeepFraction(0.25), compile_time_k: false });
    v
}

fn run_all(rt: &Runtime, tag: &str) {
    let mut flips = 0;
    let mut labels = 0;
    for (i, case) in cases().iter().enumerate() {
        labels += case.lens.iter().map(|l| r::n_chunks(*l)).sum::<usize>() * case.hr * 2;
        flips += check::<bf16>(rt, case, 100 + i as u64, rr::round_bf16);
        flips += check::<f16>(rt, case, 200 + i as u64, rr::round_f16);
    }
    println!("{tag}: {} near-tie label flips out of {labels} labels", flips);
    assert!(flips * 1000 <= labels, "too many near-tie flips");
}

#[test]
fn router_matches_reference_best_arch() {
    let Some(rt) = testing::gpu_or_skip("router_matches_reference_best_arch") else { return };
    run_all(&rt, &format!("{:?}", rt.arch()));
}

#[test]
fn router_matches_reference_sm80_path() {
    let Some(_) = testing::gpu_or_skip("router_matches_reference_sm80_path") else { return };
    let rt = Runtime::with_arch(0, Arch::Sm80).unwrap();
    run_all(&rt, "Sm80");
}

#[test]
fn router_strided_x_view() {
    // x as a slice of a wider packed buffer (row stride > D).
    let Some(rt) = testing::gpu_or_skip("router_strided_x_view") else { return };
    let mut rng = testing::rng(7);
    let (t, d, stride, hr) = (300usize, 512usize, 768usize, 4usize);
    let cu = testing::cu_seqlens(&[100, 200]);
    let xw = testing::quantize::<bf16>(&testing::rand_vec(&mut rng, t * stride, 1.0));
    let w = testing::quantize::<bf16>(&testing::rand_vec(&mut rng, 2 * hr * d, 0.05));
    let x: Vec<f64> = (0..t).flat_map(|i| xw[i * stride..i * stride + d].to_vec()).collect();
    let reference = rr::router(&x, &w, &cu, d, hr, rr::RouterPolicy::Argmax, rr::round_bf16);
    let batch = Batch::new(&rt, &cu).unwrap();
    let xd = testing::upload::<bf16>(&rt, &xw).unwrap();
    let wd = testing::upload::<bf16>(&rt, &w).unwrap();
    let mut out = RouterOutput::alloc(&rt, &batch, hr, d, true).unwrap();
    route_into(&rt, &batch, &TensorRef::strided(&xd, &[t, d], &[stride, 1]), &TensorRef::new(&wd, &[2 * hr, d]), &RouterOptions::default(), &mut out).unwrap();
    let logits = testing::download(&rt, out.logits.as_ref().unwrap()).unwrap();
    let used: Vec<usize> = (0..2).flat_map(|n| {
        let base = r::slot_base(&cu, n);
        (0..r::n_chunks([100, 200][n])).flat_map(move |c| (0..hr * 2).map(move |j| (base + c) * hr * 2 + j))
    }).collect();
    let lo: Vec<f64> = used.iter().map(|&i| logits[i]).collect();
    let lr: Vec<f64> = used.iter().map(|&i| reference.logits[i]).collect();
    testing::assert_close("strided router logits", &lo, &lr, 2e-3);
}

/// `route` sizes its outputs from validated arguments only: a w_score claiming 2^40
/// rows (one broadcast row) is an invalid argument, not a huge allocation.
#[test]
fn route_validates_before_it_allocates() {
    let Some(rt) = testing::gpu_or_skip("route_validates_before_it_allocates") else { return };
    let batch = Batch::new(&rt, &[0, 512]).unwrap();
    let xd = rt.stream().alloc_zeros::<bf16>(512 * 1024).unwrap();
    let wd = rt.stream().alloc_zeros::<bf16>(1024).unwrap();
    let x = TensorRef::new(&xd, &[512, 1024]);
    let w = TensorRef::strided(&wd, &[1 << 40, 1024], &[0, 1]);
    assert_eq!(testing::invalid_arg(route(&rt, &batch, &x, &w, &RouterOptions::default()).unwrap_err()), "w_score");
    for heads in [0, 65, usize::MAX] {
        assert_eq!(testing::invalid_arg(RouterOutput::alloc(&rt, &batch, heads, 1024, false).unwrap_err()), "num_heads");
    }
    assert_eq!(testing::invalid_arg(RouterOutput::alloc(&rt, &batch, 6, usize::MAX, false).unwrap_err()), "d_model");
    // A good call still runs.
    let w = TensorRef::strided(&wd, &[12, 1024], &[0, 1]);
    assert_eq!(testing::invalid_arg(route(&rt, &batch, &x, &w, &RouterOptions::default()).unwrap_err()), "w_score"); // not contiguous
    let wd = rt.stream().alloc_zeros::<bf16>(12 * 1024).unwrap();
    route(&rt, &batch, &x, &TensorRef::new(&wd, &[12, 1024]), &RouterOptions::default()).unwrap();
    rt.synchronize().unwrap();
}
