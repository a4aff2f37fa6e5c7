//! Tier 3: the block-sparse softmax (prefill and paged decode) against the f64
//! reference on random inputs. Skips with `skipped: no CUDA device` without a GPU.
//! Each check prints its relative error; a failure names the first bad element.

use half::{bf16, f16};
use natsl::ops::sparse::{self, BlockMask, DecodeWorkspace, PagedKv, SparseOptions};
use natsl::reference::{self as r, AttnProblem};
use natsl::tensor::Element;
use natsl::testing::{self, TestElem};
use natsl::{Arch, Batch, Runtime, TensorMut, TensorRef};
use rand::seq::SliceRandom;
use rand::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mask {
    /// Router lists from random labels (p = ATTN probability).
    Routed(f64),
    /// FlexAttention-style lists built from the same random labels.
    BlocksFromLabels(f64),
    /// FlexAttention-style lists with an independent random subset per query block
    /// (diagonal sometimes absent, entries beyond the diagonal present and skipped).
    BlocksRandom,
}

#[derive(Clone, Debug)]
struct Case {
    lens: Vec<usize>,
    hq: usize,
    hkv: usize,
    hr: usize,
    dk: usize,
    dv: usize,
    mask: Mask,
    /// q/k/v/o as slices of wider rows (NAtS-L views).
    strided: bool,
    norm: bool,
    lse: bool,
    /// Also compare with dense causal attention (all labels ATTN).
    dense_check: bool,
    /// Amplitude of q (uniform in [-q_amp, q_amp]). At 1 the scores are small and the
    /// softmax is nearly uniform, so o barely depends on q: a kernel that used a wrong
    /// Q from the second block on (the first prefill_ws at dk = dv = 64) passed the bf16
    /// check with 2.5e-3. A peaked softmax (q_amp 6) makes o depend on every score.
    q_amp: f64,
    /// What the device lists hold beyond the sorted lists of the mask.
    lists: Lists,
}

/// Device list contents: sorted (the mask's own lists), with a -1 padding entry, or with a
/// repeated and an out-of-order entry. Every prefill kernel skips both (a list entry is
/// used only if it exceeds every earlier entry), so the reference is the sorted lists' and
/// only `Unsorted` sets `NATSL_FAULT_LIST_ORDER`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Lists {
    Sorted,
    Padded,
    Unsorted,
}

fn base(lens: &[usize], dk: usize, dv: usize) -> Case {
    Case { lens: lens.to_vec(), hq: 4, hkv: 2, hr: 1, dk, dv, mask: Mask::Routed(0.5), strided: false, norm: false, lse: true, dense_check: false, q_amp: 1.0, lists: Lists::Sorted }
}

/// The list `l` (strictly ascending) as `c.lists` asks, if it fits in `room` entries and has
/// an entry below `limit` to repeat (every kernel then reads the inserted entries: those
/// before the first entry >= limit are walked by the last query block); else `l` itself.
/// Returns the list and whether it was made unsorted.
fn perturb_list(l: &[i32], lists: Lists, room: usize, limit: i32, rng: &mut impl Rng) -> (Vec<i32>, bool) {
    match lists {
        Lists::Sorted => (l.to_vec(), false),
        Lists::Padded if l.len() < room => {
            let mut v = l.to_vec();
            v.insert(rng.gen_range(0..=l.len()), -1);
            (v, false)
        }
        Lists::Unsorted if l.len() + 2 <= room => {
            let below = l.iter().take_while(|&&b| b < limit).count();
            if below == 0 {
                return (l.to_vec(), false);
            }
            let (i, j) = (rng.gen_range(0..below), rng.gen_range(0..below));
            let mut v = Vec::with_capacity(l.len() + 2);
            for (k, &b) in l.iter().enumerate() {
                v.push(b);
                if k == i {
                    v.push(b); // a repeat
                }
                if k == j {
                    v.push(rng.gen_range(0..=b)); // not above the running maximum b
                }
            }
            (v, true)
        }
        _ => (l.to_vec(), false),
    }
}

/// Upload `x` ([rows, h, d] contiguous) into a buffer with row stride `h * d + pad` (pad 0: contiguous).
fn upload_rows<T: TestElem>(rt: &Runtime, x: &[f64], rows: usize, width: usize, pad: usize) -> cudarc::driver::CudaSlice<T> {
    let stride = width + pad;
    let mut h = vec![T::from_f64(7.0); rows * stride];
    for t in 0..rows {
        for i in 0..width {
            h[t * stride + i] = T::from_f64(x[t * width + i]);
        }
    }
    rt.stream().clone_htod(&h).unwrap()
}

/// Read back `[rows, h, d]` from a buffer of row stride `h * d + pad`.
fn gather_rows(x: &[f64], rows: usize, width: usize, pad: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows * width);
    for t in 0..rows {
        out.extend_from_slice(&x[t * (width + pad)..t * (width + pad) + width]);
    }
    out
}

fn check_prefill<T: TestElem + Element>(rt: &Runtime, c: &Case, seed: u64) {
    let what = format!("prefill {:?} {c:?} arch {:?}", T::DTYPE, rt.arch());
    println!("{what}");
    let mut rng = testing::rng(seed);
    let cu = testing::cu_seqlens(&c.lens);
    let t = *cu.last().unwrap() as usize;
    let n = c.lens.len();
    let (hq, hkv, dk, dv) = (c.hq, c.hkv, c.dk, c.dv);
    let q = testing::quantize::<T>(&testing::rand_vec(&mut rng, t * hq * dk, c.q_amp));
    let k = testing::quantize::<T>(&testing::rand_vec(&mut rng, t * hkv * dk, 1.0));
    let v = testing::quantize::<T>(&testing::rand_vec(&mut rng, t * hkv * dv, 1.0));
    let qw = testing::quantize::<T>(&testing::rand_range(&mut rng, dk, 0.5, 1.5));
    let kw = testing::quantize::<T>(&testing::rand_range(&mut rng, dk, 0.5, 1.5));
    let slots = r::num_slots(t, n);
    let p_attn = match c.mask {
        Mask::Routed(p) | Mask::BlocksFromLabels(p) => p,
        Mask::BlocksRandom => 0.5,
    };
    let mut labels = vec![r::LABEL_GDN; slots * c.hr];
    for s in 0..n {
        let base = r::slot_base(&cu, s);
        let nch = r::n_chunks(c.lens[s]);
        for ch in 0..nch {
            for h in 0..c.hr {
                labels[(base + ch) * c.hr + h] = if ch * 64 + 64 > c.lens[s] { r::LABEL_PARTIAL } else if rng.gen_bool(p_attn) { r::LABEL_ATTN } else { r::LABEL_GDN };
            }
        }
    }
    let prob = AttnProblem {
        q: &q,
        k: &k,
        v: &v,
        cu_seqlens: &cu,
        hq,
        hkv,
        dk,
        dv,
        scale: None,
        q_norm_w: if c.norm { Some(&qw) } else { None },
        k_norm_w: if c.norm { Some(&kw) } else { None },
    };

    // Mask lists (device) and the reference.
    let max_chunks = c.lens.iter().map(|&l| r::n_chunks(l)).max().unwrap();
    let mut unsorted = false; // some list read by the kernels holds a repeated or out-of-order entry
    let (reference, list_a, list_b, hm_dims): (r::AttnOutput, Vec<i32>, Vec<i32>, (usize, usize, usize)) = match c.mask {
        Mask::Routed(_) => {
            let (mut list, mut count) = r::attn_list_from_labels(&labels, &cu, c.hr);
            for s in 0..n {
                let base = r::slot_base(&cu, s);
                let nch = r::n_chunks(c.lens[s]);
                for h in 0..c.hr {
                    // The kernels read min(count, chunks) entries (the list's storage holds that many).
                    let (o, cnt) = (h * slots + base, count[s * c.hr + h] as usize);
                    let (l, bad) = perturb_list(&list[o..o + cnt], c.lists, nch, nch as i32 - 1, &mut rng);
                    list[o..o + l.len()].copy_from_slice(&l);
                    count[s * c.hr + h] = l.len() as i32;
                    unsorted |= bad;
                }
            }
            (r::sparse_attention(&prob, &labels, c.hr), list, count, (c.hr, 0, 0))
        }
        Mask::BlocksFromLabels(_) => {
            // Mask head = routing head; lists = earlier ATTN chunks + the diagonal.
            let qb = max_chunks + 1;
            let kb = max_chunks + 2;
            let mut num = vec![0i32; n * c.hr * qb];
            let mut idx = vec![-1i32; n * c.hr * qb * kb];
            for s in 0..n {
                let base = r::slot_base(&cu, s);
                for h in 0..c.hr {
                    for ch in 0..r::n_chunks(c.lens[s]) {
                        let mut l: Vec<i32> = (0..ch).filter(|&b| labels[(base + b) * c.hr + h] == r::LABEL_ATTN).map(|b| b as i32).collect();
                        l.push(ch as i32);
                        let (l, bad) = perturb_list(&l, c.lists, kb, i32::MAX, &mut rng);
                        unsorted |= bad;
                        let o = ((s * c.hr + h) * qb + ch) * kb;
                        idx[o..o + l.len()].copy_from_slice(&l);
                        num[(s * c.hr + h) * qb + ch] = l.len() as i32;
                    }
                }
            }
            (r::sparse_attention(&prob, &labels, c.hr), num, idx, (c.hr, qb, kb))
        }
        Mask::BlocksRandom => {
            // Per query head, per query block: a random subset of all blocks (even later ones).
            let (hm, qb, kb) = (hq, max_chunks, max_chunks);
            let mut num = vec![0i32; n * hm * qb];
            let mut idx = vec![0i32; n * hm * qb * kb];
            let mut out = r::AttnOutput { o: vec![0.0; t * hq * dv], lse: vec![f64::NEG_INFINITY; t * hq] };
            let scale = 1.0 / (dk as f64).sqrt();
            for s in 0..n {
                let start = cu[s] as usize;
                let nch = r::n_chunks(c.lens[s]);
                for j in 0..hm {
                    for ch in 0..nch {
                        let l: Vec<i32> = (0..nch).filter(|_| rng.gen_bool(0.5)).map(|b| b as i32).collect();
                        let (dl, bad) = perturb_list(&l, c.lists, kb, i32::MAX, &mut rng);
                        unsorted |= bad;
                        let o = ((s * hm + j) * qb + ch) * kb;
                        idx[o..o + dl.len()].copy_from_slice(&dl);
                        num[(s * hm + j) * qb + ch] = dl.len() as i32;
                        let h = j / (hq / hkv);
                        for i in start + ch * 64..(start + ch * 64 + 64).min(start + c.lens[s]) {
                            let keys: Vec<usize> = l.iter().map(|&b| b as usize).filter(|&b| b <= ch).flat_map(|b| start + b * 64..start + b * 64 + 64).filter(|&kt| kt <= i).collect();
                            if keys.is_empty() {
                                continue; // o = 0, lse = -inf
                            }
                            let qn = norm(&q[(i * hq + j) * dk..(i * hq + j + 1) * dk], prob.q_norm_w);
                            let ks: Vec<Vec<f64>> = keys.iter().map(|&kt| norm(&k[(kt * hkv + h) * dk..(kt * hkv + h + 1) * dk], prob.k_norm_w)).collect();
                            let ksr: Vec<&[f64]> = ks.iter().map(|x| x.as_slice()).collect();
                            let vs: Vec<&[f64]> = keys.iter().map(|&kt| &v[(kt * hkv + h) * dv..(kt * hkv + h + 1) * dv]).collect();
                            let (oo, lse) = r::softmax_attend(&qn, &ksr, &vs, scale);
                            out.o[(i * hq + j) * dv..(i * hq + j + 1) * dv].copy_from_slice(&oo);
                            out.lse[i * hq + j] = lse;
                        }
                    }
                }
            }
            (out, num, idx, (hm, qb, kb))
        }
    };

    // Device tensors.
    let batch = Batch::new(rt, &cu).unwrap();
    let pad = if c.strided { 64 } else { 0 };
    let qd = upload_rows::<T>(rt, &q, t, hq * dk, pad);
    let kd = upload_rows::<T>(rt, &k, t, hkv * dk, pad);
    let vd = upload_rows::<T>(rt, &v, t, hkv * dv, pad);
    let qwd = testing::upload::<T>(rt, &qw).unwrap();
    let kwd = testing::upload::<T>(rt, &kw).unwrap();
    let la = rt.stream().clone_htod(&list_a).unwrap();
    let lb = rt.stream().clone_htod(&list_b).unwrap();
    let mask = match c.mask {
        Mask::Routed(_) => BlockMask::Routed { attn_list: TensorRef::new(&la, &[c.hr, slots]), attn_count: TensorRef::new(&lb, &[n, c.hr]) },
        _ => BlockMask::Blocks { kv_num_blocks: TensorRef::new(&la, &[n, hm_dims.0, hm_dims.1]), kv_indices: TensorRef::new(&lb, &[n, hm_dims.0, hm_dims.1, hm_dims.2]) },
    };
    let opts0 = SparseOptions {
        q_norm_w: if c.norm { Some(TensorRef::new(&qwd, &[dk])) } else { None },
        k_norm_w: if c.norm { Some(TensorRef::new(&kwd, &[dk])) } else { None },
        ..Default::default()
    };
    // Every prefill kernel the device has (mma.sync; wgmma, pipelined wgmma and
    // warp-specialized on sm_90a).
    // The warp-specialized kernel walks router lists only (block lists are an error there).
    let routed = matches!(c.mask, Mask::Routed(_));
    // NATSL_TEST_KERNELS=WarpSpecialized,Wgmma (names as printed): only those (sanitizer runs).
    let only = std::env::var("NATSL_TEST_KERNELS").ok();
    let wanted = |k: sparse::PrefillKernel| only.as_ref().is_none_or(|o| o.split(',').any(|n| n == format!("{k:?}")));
    assert!(c.lists != Lists::Unsorted || unsorted, "{what}: no list had room for the unsorted entries");
    for kernel in sparse::prefill_kernels(rt).into_iter().filter(|&k| (routed || k != sparse::PrefillKernel::WarpSpecialized) && wanted(k)) {
        let what = format!("{what} kernel {kernel:?}");
        rt.device_faults().unwrap(); // start from a clear fault word
        let opts = SparseOptions { kernel, ..opts0.clone() };
        let mut od = testing::poisoned::<T>(rt, t * (hq * dv + pad)).unwrap();
        let mut lsed = testing::poisoned::<f32>(rt, t * hq).unwrap();
        {
            let qv = TensorRef::strided(&qd, &[t, hq, dk], &[hq * dk + pad, dk, 1]);
            let kv = TensorRef::strided(&kd, &[t, hkv, dk], &[hkv * dk + pad, dk, 1]);
            let vv = TensorRef::strided(&vd, &[t, hkv, dv], &[hkv * dv + pad, dv, 1]);
            let mut ov = TensorMut::strided(&mut od, &[t, hq, dv], &[hq * dv + pad, dv, 1]);
            let mut lv = TensorMut::new(&mut lsed, &[t, hq]);
            sparse::prefill(rt, &batch, &qv, &kv, &vv, &mask, &opts, &mut ov, if c.lse { Some(&mut lv) } else { None }).unwrap();
        }
        rt.synchronize().unwrap();
        let faults = rt.device_faults().unwrap();
        let want = if unsorted { natsl::params::NATSL_FAULT_LIST_ORDER } else { 0 };
        assert_eq!(faults.0, want, "{what}: device faults {faults}");
        let o = gather_rows(&testing::download(rt, &od).unwrap(), t, hq * dv, pad);
        // Pad columns of o must be untouched (poison).
        if pad > 0 {
            let raw = testing::download(rt, &od).unwrap();
            assert!(raw[hq * dv..hq * dv + pad].iter().all(|x| x.is_nan()), "{what}: wrote outside o's view");
        }
        let tol = testing::tolerance(T::DTYPE);
        testing::assert_close(&format!("{what}: o"), &o, &reference.o, tol);
        if c.lse {
            let l = testing::download(rt, &lsed).unwrap();
            // Rows with no visible key: -inf both sides; compare the rest.
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for (x, y) in l.iter().zip(&reference.lse) {
                if y.is_finite() {
                    a.push(*x);
                    b.push(*y);
                } else {
                    assert!(*x == f64::NEG_INFINITY, "{what}: lse {x} where nothing is visible");
                }
            }
            testing::assert_close(&format!("{what}: lse"), &a, &b, 2e-3);
        }
        if c.dense_check {
            let dense = r::dense_causal_attention(&prob);
            testing::assert_close(&format!("{what}: o vs dense causal"), &o, &dense.o, tol);
        }
    }
}

fn norm(x: &[f64], w: Option<&[f64]>) -> Vec<f64> {
    match w {
        Some(w) => r::rms_normalize(x, Some(w)),
        None => x.to_vec(),
    }
}

fn both_arches(f: impl Fn(&Runtime)) {
    let Some(rt) = testing::gpu_or_skip("gpu_sparse") else { return };
    f(&rt);
    if rt.arch() != Arch::Sm80 {
        let rt80 = Runtime::with_arch(0, Arch::Sm80).unwrap();
        f(&rt80);
    }
}

const RAGGED: [usize; 5] = [130, 64, 257, 1, 200];

#[test]
fn prefill_routed_ragged_every_dims() {
    both_arches(|rt| {
        for (i, &(dk, dv)) in sparse::supported_dims().iter().enumerate() {
            let c = base(&RAGGED, dk as usize, dv as usize);
            check_prefill::<bf16>(rt, &c, 10 + i as u64);
            check_prefill::<f16>(rt, &c, 20 + i as u64);
        }
    });
}

#[test]
fn prefill_peaked_softmax_every_dims() {
    // Large scores (q in [-6, 6]): o depends on q through every visited block, so a
    // kernel that loses or corrupts Q (or a score) anywhere in its block loop fails
    // here even where the near-uniform softmax of the other cases hides it.
    both_arches(|rt| {
        for (i, &(dk, dv)) in sparse::supported_dims().iter().enumerate() {
            let mut c = base(&RAGGED, dk as usize, dv as usize);
            c.q_amp = 6.0;
            check_prefill::<bf16>(rt, &c, 110 + i as u64);
            check_prefill::<f16>(rt, &c, 120 + i as u64);
        }
    });
}

#[test]
fn prefill_all_attn_is_dense_causal_and_all_gdn_is_diagonal() {
    both_arches(|rt| {
        for (dk, dv) in [(64, 128), (128, 128)] {
            let mut c = base(&[300, 129, 64], dk, dv);
            c.mask = Mask::Routed(1.0);
            c.dense_check = true;
            check_prefill::<bf16>(rt, &c, 31);
            c.mask = Mask::Routed(0.0);
            c.dense_check = false;
            check_prefill::<bf16>(rt, &c, 32);
        }
    });
}

#[test]
fn prefill_natsl_views_gqa_rmsnorm() {
    both_arches(|rt| {
        // NAtS-L 340M softmax heads (scaled down in T): 12 heads, 64/128, 6 routing heads, strided views, RMSNorm.
        let mut c = base(&[450, 190], 64, 128);
        c.hq = 12;
        c.hkv = 12;
        c.hr = 6;
        c.strided = true;
        c.norm = true;
        c.mask = Mask::Routed(0.4);
        check_prefill::<bf16>(rt, &c, 41);
        check_prefill::<f16>(rt, &c, 42);
        // GQA 4:1 with 2 routing heads, no norm, no lse.
        let mut c = base(&[333, 65], 128, 128);
        c.hq = 8;
        c.hkv = 2;
        c.hr = 2;
        c.lse = false;
        check_prefill::<bf16>(rt, &c, 43);
        // norm on d 256
        let mut c = base(&[200], 256, 256);
        c.norm = true;
        check_prefill::<f16>(rt, &c, 44);
    });
}

#[test]
fn prefill_long_sequences_wrap_the_kv_ring() {
    // Long lists: the K/V rings of the wgmma kernels wrap many times (mbarrier phases
    // of the warp-specialized kernel flip on every wrap); odd and even chunk counts,
    // a partial last chunk on either chunk of a pair.
    both_arches(|rt| {
        for (dk, dv) in [(64, 64), (64, 128), (128, 128)] {
            let mut c = base(&[1500, 777, 1024], dk, dv);
            c.mask = Mask::Routed(1.0);
            c.dense_check = true;
            check_prefill::<bf16>(rt, &c, 91);
            c.mask = Mask::Routed(0.3);
            c.dense_check = false;
            c.hq = 6;
            c.hkv = 3;
            c.hr = 3;
            check_prefill::<f16>(rt, &c, 92);
        }
    });
}

#[test]
fn prefill_persistent_ctas_run_many_tiles_on_two_streams() {
    // Far more chunk-pair tiles than SMs (16 pairs x 4 sequences x 8 heads = 512, half of
    // them empty: short sequences), so each persistent CTA of the warp-specialized kernel
    // runs several tiles and skips empty ones; run twice on the runtime's stream (the
    // launch rewinds its tile counters) and once on a second stream (its own counters),
    // k-RMSNorm on (its scale warps pass the tile markers too) and off.
    let Some(rt) = testing::gpu_or_skip("gpu_sparse") else { return };
    let s2 = rt.context().new_stream().unwrap();
    let rt2 = rt.on_stream(s2).unwrap();
    let mut c = base(&[2048, 100, 1000, 64], 64, 64);
    c.hq = 8;
    c.hkv = 2;
    c.hr = 2;
    c.mask = Mask::Routed(0.5);
    c.q_amp = 6.0;
    for (i, r) in [&rt, &rt, &rt2].into_iter().enumerate() {
        c.norm = i == 1;
        check_prefill::<bf16>(r, &c, 120 + i as u64);
    }
}

#[test]
fn prefill_block_lists() {
    both_arches(|rt| {
        for (dk, dv) in [(64, 128), (128, 128)] {
            let mut c = base(&RAGGED, dk, dv);
            c.mask = Mask::BlocksFromLabels(0.5);
            check_prefill::<bf16>(rt, &c, 51);
            c.mask = Mask::BlocksRandom;
            c.hr = 1;
            check_prefill::<f16>(rt, &c, 52);
        }
    });
}

#[test]
fn prefill_unsorted_lists_skip_and_record() {
    // A repeated and an out-of-order entry in router and block lists: every kernel skips
    // both (the reference is the sorted lists') and sets NATSL_FAULT_LIST_ORDER; -1
    // padding entries are skipped and set nothing.
    both_arches(|rt| {
        for (dk, dv) in [(64, 128), (128, 128)] {
            let mut c = base(&[700, 130, 1000, 64, 400], dk, dv);
            c.lists = Lists::Unsorted;
            c.q_amp = 6.0;
            check_prefill::<bf16>(rt, &c, 61);
            c.hq = 8;
            c.hr = 2;
            check_prefill::<f16>(rt, &c, 62);
            c.lists = Lists::Padded;
            check_prefill::<bf16>(rt, &c, 63);
            c.lists = Lists::Unsorted;
            c.mask = Mask::BlocksFromLabels(0.5);
            check_prefill::<bf16>(rt, &c, 64);
            c.mask = Mask::BlocksRandom;
            c.hr = 1;
            check_prefill::<f16>(rt, &c, 65);
            c.lists = Lists::Padded;
            check_prefill::<bf16>(rt, &c, 66);
        }
    });
}

// ---------------------------------------------------------------- decode

#[derive(Clone, Debug)]
struct DCase {
    /// History lengths including the nq new tokens.
    lens: Vec<usize>,
    nq: usize,
    hq: usize,
    hkv: usize,
    hr: usize,
    dk: usize,
    dv: usize,
    p_attn: f64,
    norm: bool,
    splits: Option<usize>,
    /// Device-side inputs made bad on purpose (see `DFault`).
    fault: DFault,
}

/// A padded sequence (cur_page -1, no pages: silent, o = 0, lse = -inf), a page id out of
/// range appended to one list (skipped, recorded), or a page count past max_pages (clamped,
/// recorded; the filler entries it then reads are bad page ids, skipped and recorded).
#[derive(Clone, Copy, Debug, PartialEq)]
enum DFault {
    None,
    PaddedSeq(usize),
    BadPage(usize),
    BadCount(usize),
}

fn check_decode<T: TestElem + Element>(rt: &Runtime, c: &DCase, seed: u64) {
    let what = format!("decode {:?} {c:?} arch {:?}", T::DTYPE, rt.arch());
    println!("{what}");
    let mut rng = testing::rng(seed);
    let cu = testing::cu_seqlens(&c.lens);
    let t = *cu.last().unwrap() as usize;
    let n = c.lens.len();
    let (hq, hkv, hr, dk, dv, nq) = (c.hq, c.hkv, c.hr, c.dk, c.dv, c.nq);
    let k = testing::quantize::<T>(&testing::rand_vec(&mut rng, t * hkv * dk, 1.0));
    let v = testing::quantize::<T>(&testing::rand_vec(&mut rng, t * hkv * dv, 1.0));
    let qn = testing::quantize::<T>(&testing::rand_vec(&mut rng, n * nq * hq * dk, 1.0));
    let qw = testing::quantize::<T>(&testing::rand_range(&mut rng, dk, 0.5, 1.5));
    let kw = testing::quantize::<T>(&testing::rand_range(&mut rng, dk, 0.5, 1.5));
    let slots = r::num_slots(t, n);
    let mut labels = vec![r::LABEL_GDN; slots * hr];
    for s in 0..n {
        let base = r::slot_base(&cu, s);
        for ch in 0..r::n_chunks(c.lens[s]) {
            for h in 0..hr {
                labels[(base + ch) * hr + h] = if rng.gen_bool(c.p_attn) { r::LABEL_ATTN } else { r::LABEL_GDN };
            }
        }
    }
    let prob = AttnProblem { q: &qn, k: &k, v: &v, cu_seqlens: &cu, hq, hkv, dk, dv, scale: None, q_norm_w: c.norm.then_some(&qw[..]), k_norm_w: c.norm.then_some(&kw[..]) };
    let reference = r::sparse_decode(&prob, &labels, hr, nq);

    // Page pool: one page per chunk slot, at a shuffled page id; bytes past a
    // sequence's end are NaN (the kernel must never let them reach the output).
    let mut perm: Vec<usize> = (0..slots).collect();
    perm.shuffle(&mut rng);
    let np = slots;
    let mut kp = vec![f64::NAN; np * 64 * hkv * dk];
    let mut vp = vec![f64::NAN; np * 64 * hkv * dv];
    let max_pages = r::n_chunks(*c.lens.iter().max().unwrap()) + 2;
    let mut table = vec![-7i32; n * hr * max_pages];
    let mut count = vec![0i32; n * hr];
    let mut cur_page = vec![0i32; n];
    let mut cur_len = vec![0i32; n];
    for s in 0..n {
        let start = cu[s] as usize;
        let base = r::slot_base(&cu, s);
        let cur = (c.lens[s] - 1) / 64;
        for ch in 0..=cur {
            let pg = perm[base + ch];
            for tok in 0..64 {
                let tt = start + ch * 64 + tok;
                if tt >= start + c.lens[s] {
                    break;
                }
                for h in 0..hkv {
                    kp[((pg * 64 + tok) * hkv + h) * dk..][..dk].copy_from_slice(&k[(tt * hkv + h) * dk..][..dk]);
                    vp[((pg * 64 + tok) * hkv + h) * dv..][..dv].copy_from_slice(&v[(tt * hkv + h) * dv..][..dv]);
                }
            }
        }
        cur_page[s] = perm[base + cur] as i32;
        cur_len[s] = (c.lens[s] - cur * 64) as i32;
        assert!(cur_len[s] as usize >= nq, "test case: new tokens must share the current chunk");
        for h in 0..hr {
            let mut kept: Vec<i32> = (0..cur).filter(|&ch| labels[(base + ch) * hr + h] == r::LABEL_ATTN).map(|ch| perm[base + ch] as i32).collect();
            kept.shuffle(&mut rng);
            table[(s * hr + h) * max_pages..][..kept.len()].copy_from_slice(&kept);
            count[s * hr + h] = kept.len() as i32;
        }
    }

    let mut want_faults = 0u32;
    match c.fault {
        DFault::None => {}
        DFault::PaddedSeq(s) => {
            cur_page[s] = -1;
            count[s * hr..(s + 1) * hr].iter_mut().for_each(|x| *x = 0);
        }
        DFault::BadPage(s) => {
            let i = count[s * hr] as usize;
            table[s * hr * max_pages + i] = 1 << 20;
            count[s * hr] += 1;
            want_faults |= natsl::params::NATSL_FAULT_PAGE_ID;
        }
        DFault::BadCount(s) => {
            count[s * hr] = max_pages as i32 + 5;
            want_faults |= natsl::params::NATSL_FAULT_PAGE_LEN | natsl::params::NATSL_FAULT_PAGE_ID;
        }
    }
    rt.device_faults().unwrap(); // start from a clear fault word
    let up = |x: &[i32]| rt.stream().clone_htod(x).unwrap();
    let (td, cd, cpd, cld) = (up(&table), up(&count), up(&cur_page), up(&cur_len));
    let kpd = testing::upload::<T>(rt, &kp).unwrap();
    let vpd = testing::upload::<T>(rt, &vp).unwrap();
    let qd = testing::upload::<T>(rt, &qn).unwrap();
    let qwd = testing::upload::<T>(rt, &qw).unwrap();
    let kwd = testing::upload::<T>(rt, &kw).unwrap();
    let rows = n * nq;
    let mut od = testing::poisoned::<T>(rt, rows * hq * dv).unwrap();
    let mut lsed = testing::poisoned::<f32>(rt, rows * hq).unwrap();
    let kv = PagedKv {
        k_pages: TensorRef::new(&kpd, &[np, 64, hkv, dk]),
        v_pages: TensorRef::new(&vpd, &[np, 64, hkv, dv]),
        page_table: TensorRef::new(&td, &[n, hr, max_pages]),
        page_count: TensorRef::new(&cd, &[n, hr]),
        cur_page: TensorRef::new(&cpd, &[n]),
        cur_len: TensorRef::new(&cld, &[n]),
    };
    let opts = SparseOptions {
        q_norm_w: c.norm.then(|| TensorRef::new(&qwd, &[dk])),
        k_norm_w: c.norm.then(|| TensorRef::new(&kwd, &[dk])),
        num_splits: c.splits,
        ..Default::default()
    };
    let mut ws = DecodeWorkspace::new();
    {
        let mut ov = TensorMut::new(&mut od, &[rows, hq, dv]);
        let mut lv = TensorMut::new(&mut lsed, &[rows, hq]);
        sparse::decode(rt, &TensorRef::new(&qd, &[rows, hq, dk]), nq, &kv, &opts, &mut ov, Some(&mut lv), &mut ws).unwrap();
    }
    rt.synchronize().unwrap();
    let o = testing::download(rt, &od).unwrap();
    let mut l = testing::download(rt, &lsed).unwrap();
    let (mut o_ref, mut l_ref) = (reference.o.clone(), reference.lse.clone());
    if let DFault::PaddedSeq(s) = c.fault {
        // Nothing visible: o = 0 and lse = -inf on the padded sequence's rows.
        let (r0, r1) = (s * nq * hq, (s + 1) * nq * hq);
        o_ref[r0 * dv..r1 * dv].iter_mut().for_each(|x| *x = 0.0);
        assert!(l[r0..r1].iter().all(|&x| x == f64::NEG_INFINITY), "{what}: padded lse {:?}", &l[r0..r1]);
        l[r0..r1].iter_mut().for_each(|x| *x = 0.0);
        l_ref[r0..r1].iter_mut().for_each(|x| *x = 0.0);
    }
    let tol = testing::tolerance(T::DTYPE);
    testing::assert_close(&format!("{what}: o"), &o, &o_ref, tol);
    testing::assert_close(&format!("{what}: lse"), &l, &l_ref, 2e-3);
    let faults = rt.device_faults().unwrap();
    assert_eq!(faults.0, want_faults, "{what}: device faults {faults}");
}

fn dcase(lens: &[usize], nq: usize, dk: usize, dv: usize) -> DCase {
    DCase { lens: lens.to_vec(), nq, hq: 12, hkv: 12, hr: 6, dk, dv, p_attn: 0.4, norm: false, splits: None, fault: DFault::None }
}

#[test]
fn decode_one_query_every_dims() {
    both_arches(|rt| {
        for (i, &(dk, dv)) in sparse::supported_dims().iter().enumerate() {
            let c = DCase { hq: 4, hkv: 2, hr: 1, ..dcase(&[1000, 65, 130, 64, 1], 1, dk as usize, dv as usize) };
            check_decode::<bf16>(rt, &c, 60 + i as u64);
            check_decode::<f16>(rt, &c, 70 + i as u64);
        }
    });
}

#[test]
fn decode_padded_sequences_and_bad_pages() {
    both_arches(|rt| {
        for (i, fault) in [DFault::PaddedSeq(1), DFault::BadPage(0), DFault::BadCount(2)].into_iter().enumerate() {
            for splits in [Some(1), Some(3)] {
                let c = DCase { fault, splits, p_attn: 0.7, ..dcase(&[900, 200, 640, 70], 2, 64, 128) };
                check_decode::<bf16>(rt, &c, 90 + i as u64);
            }
        }
    });
}

#[test]
fn decode_speculative_queries_and_splits() {
    both_arches(|rt| {
        // NAtS-L heads, 4 new tokens at different in-chunk positions.
        for splits in [Some(1), Some(3), None] {
            let c = DCase { splits, ..dcase(&[2000, 72, 700, 127], 4, 64, 128) };
            check_decode::<bf16>(rt, &c, 80);
        }
        // 8 queries, GQA 8 heads per kv head: 64 rows = 4 row tiles; all ATTN; RMSNorm.
        let c = DCase { hq: 16, hkv: 2, hr: 2, p_attn: 1.0, norm: true, splits: Some(4), ..dcase(&[520, 264], 8, 128, 128) };
        check_decode::<f16>(rt, &c, 81);
        // 5 queries x 3 heads = 15 rows (a partial row tile), many splits, long list.
        let c = DCase { hq: 6, hkv: 2, hr: 1, p_attn: 0.9, splits: Some(17), ..dcase(&[4000, 1500], 5, 64, 128) };
        check_decode::<bf16>(rt, &c, 82);
    });
}
