//! Tier 3: the merge epilogue against the f64 reference (SPEC.md sections 6 and 8)
//! on random non-zero inputs, outputs poisoned (NaN) before each launch. Skips with
//! `skipped: no CUDA device` without a GPU.

use half::{bf16, f16};
use natsl::ops::merge::{self, MergeInputs};
use natsl::reference as r;
use natsl::tensor::Element;
use natsl::testing::{self, TestElem};
use natsl::{Arch, DType, Runtime, TensorMut, TensorRef};
use rand::Rng;

#[derive(Clone, Copy, Debug)]
struct Case {
    t: usize,
    ha: usize,
    dvs: usize,
    /// Row tensors as slices of wider rows (o_gdn a slice of a GDN output, z of a
    /// projection, out with padding that must stay poisoned).
    strided: bool,
    w_f32: bool,
}

/// Host `[t, ha, dvs]` `x` into a buffer of token stride `ts` and head stride `hs`
/// starting at element `off`, the rest `fill`.
fn place<T: TestElem>(x: &[f64], c: &Case, ts: usize, hs: usize, off: usize, len: usize, fill: f64) -> Vec<T> {
    let mut h = vec![T::from_f64(fill); len];
    for t in 0..c.t {
        for j in 0..c.ha {
            for d in 0..c.dvs {
                h[off + t * ts + j * hs + d] = T::from_f64(x[(t * c.ha + j) * c.dvs + d]);
            }
        }
    }
    h
}

fn check<T: TestElem + Element>(rt: &Runtime, c: &Case, seed: u64) {
    let what = format!("merge {:?} {c:?} arch {:?}", T::DTYPE, rt.arch());
    let mut rng = testing::rng(seed);
    let (t, ha, dvs) = (c.t, c.ha, c.dvs);
    let n = t * ha * dvs;
    // Branch outputs of different scales (the RMSNorms must remove them), a gate over
    // both signs of SiLU, logits that sometimes saturate the softmax.
    let o_gdn = testing::quantize::<T>(&testing::rand_vec(&mut rng, n, 3.0));
    let o_att = testing::quantize::<T>(&testing::rand_vec(&mut rng, n, 0.2));
    let z = testing::quantize::<T>(&testing::rand_vec(&mut rng, n, 4.0));
    let mut w: Vec<f64> = testing::rand_vec(&mut rng, t * ha * 2, 3.0);
    for x in w.iter_mut() {
        if rng.gen_bool(0.05) {
            *x *= 20.0;
        }
    }
    let w = if c.w_f32 { w.iter().map(|&x| x as f32 as f64).collect() } else { testing::quantize::<T>(&w) };
    let gg = testing::quantize::<T>(&testing::rand_range(&mut rng, dvs, 0.5, 1.5));
    let ga = testing::quantize::<T>(&testing::rand_range(&mut rng, dvs, -1.5, -0.5));
    let want = r::merge::merge(&o_gdn, &o_att, &w, &gg, &ga, &z, ha, dvs);

    // Layouts: (token stride, head stride, offset) per row tensor.
    let row = ha * dvs;
    let (g_l, a_l, z_l, o_l) = if c.strided {
        ((2 * row + 64, dvs, 64), (row, dvs, 0), (3 * row, dvs, 2 * row), (ha * (dvs + 8) + 8, dvs + 8, 8))
    } else {
        ((row, dvs, 0), (row, dvs, 0), (row, dvs, 0), (row, dvs, 0))
    };
    let len = |l: (usize, usize, usize)| l.2 + (t - 1) * l.0 + (ha - 1) * l.1 + dvs + 8;
    let s = rt.stream();
    let gd = s.clone_htod(&place::<T>(&o_gdn, c, g_l.0, g_l.1, g_l.2, len(g_l), 5.0)).unwrap();
    let ad = s.clone_htod(&place::<T>(&o_att, c, a_l.0, a_l.1, a_l.2, len(a_l), 5.0)).unwrap();
    let zd = s.clone_htod(&place::<T>(&z, c, z_l.0, z_l.1, z_l.2, len(z_l), 5.0)).unwrap();
    let ggd = testing::upload::<T>(rt, &gg).unwrap();
    let gad = testing::upload::<T>(rt, &ga).unwrap();
    // w: [t, ha, 2] with a token stride of 2 * ha + 6 when strided.
    let wts = if c.strided { 2 * ha + 6 } else { 2 * ha };
    let wh: Vec<f64> = (0..t * wts).map(|i| if i % wts < 2 * ha { w[(i / wts) * 2 * ha + i % wts] } else { 9.0 }).collect();
    let wd32 = testing::upload::<f32>(rt, &wh).unwrap();
    let wdt = testing::upload::<T>(rt, &wh).unwrap();
    let mut od = testing::poisoned::<T>(rt, len(o_l)).unwrap();

    let view = |b: &cudarc::driver::CudaSlice<T>, l: (usize, usize, usize)| {
        let v = b.slice(l.2..);
        // The view borrows the slice only for this call; TensorRef copies what it needs.
        let r = TensorRef::strided(&v, &[t, ha, dvs], &[l.0, l.1, 1]);
        unsafe { TensorRef::from_raw(r.ptr(), r.avail(), r.dtype(), r.shape(), r.strides()) }
    };
    let wv = if c.w_f32 { TensorRef::strided(&wd32, &[t, ha, 2], &[wts, 2, 1]) } else { TensorRef::strided(&wdt, &[t, ha, 2], &[wts, 2, 1]) };
    let inp = MergeInputs {
        o_gdn: view(&gd, g_l),
        o_att: view(&ad, a_l),
        w: wv,
        gamma_gdn: TensorRef::new(&ggd, &[dvs]),
        gamma_att: TensorRef::new(&gad, &[dvs]),
        z: view(&zd, z_l),
    };
    {
        let mut ov = od.slice_mut(o_l.2..);
        let mut o = TensorMut::strided(&mut ov, &[t, ha, dvs], &[o_l.0, o_l.1, 1]);
        merge::merge(rt, &inp, &mut o).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let raw = testing::download(rt, &od).unwrap();
    let mut got = Vec::with_capacity(n);
    let mut inside = vec![false; raw.len()];
    for ti in 0..t {
        for j in 0..ha {
            let base = o_l.2 + ti * o_l.0 + j * o_l.1;
            got.extend_from_slice(&raw[base..base + dvs]);
            inside[base..base + dvs].iter_mut().for_each(|x| *x = true);
        }
    }
    // Everything outside the view must still be poison.
    if let Some(i) = raw.iter().zip(&inside).position(|(x, &ins)| !ins && !x.is_nan()) {
        panic!("{what}: wrote element {i}, outside out's view");
    }
    testing::assert_close(&what, &got, &want, testing::tolerance(T::DTYPE));
}

fn both_arches(f: impl Fn(&Runtime)) {
    let Some(rt) = testing::gpu_or_skip("gpu_merge") else { return };
    f(&rt);
    if rt.arch() != Arch::Sm80 {
        let rt80 = Runtime::with_arch(0, Arch::Sm80).unwrap();
        f(&rt80);
    }
}

#[test]
fn merge_every_dvs_both_dtypes_ragged_t() {
    both_arches(|rt| {
        for (i, dvs) in natsl_codegen::catalog::MERGE_DIMS.into_iter().enumerate() {
            // T = 1, odd T that leaves a CTA partly empty, and T past one CTA row.
            for (k, (t, ha)) in [(1, 1), (37, 12), (301, 5)].into_iter().enumerate() {
                let c = Case { t, ha, dvs: dvs as usize, strided: false, w_f32: true };
                let seed = 100 * i as u64 + 10 * k as u64;
                check::<bf16>(rt, &c, seed);
                check::<f16>(rt, &c, seed + 1);
            }
        }
    });
}

#[test]
fn merge_strided_views_and_activation_logits() {
    both_arches(|rt| {
        for (i, dvs) in natsl_codegen::catalog::MERGE_DIMS.into_iter().enumerate() {
            for (k, w_f32) in [true, false].into_iter().enumerate() {
                let c = Case { t: 133, ha: 6, dvs: dvs as usize, strided: true, w_f32 };
                let seed = 1000 + 100 * i as u64 + 10 * k as u64;
                check::<bf16>(rt, &c, seed);
                check::<f16>(rt, &c, seed + 1);
            }
        }
    });
}

#[test]
fn merge_large_t() {
    // Enough rows for many waves of CTAs (a grid-indexing error past the first wave).
    both_arches(|rt| {
        let c = Case { t: 4099, ha: 12, dvs: 128, strided: false, w_f32: true };
        check::<bf16>(rt, &c, 7);
    });
}

#[test]
fn merge_rejects_bad_arguments_on_the_device_path() {
    let Some(rt) = testing::gpu_or_skip("gpu_merge") else { return };
    let s = rt.stream();
    let a = s.alloc_zeros::<bf16>(4 * 2 * 128).unwrap();
    let w = s.alloc_zeros::<f32>(4 * 2 * 2).unwrap();
    let g = s.alloc_zeros::<bf16>(128).unwrap();
    let inp = MergeInputs {
        o_gdn: TensorRef::new(&a, &[4, 2, 128]),
        o_att: TensorRef::new(&a, &[4, 2, 128]),
        w: TensorRef::new(&w, &[4, 2, 2]),
        gamma_gdn: TensorRef::new(&g, &[128]),
        gamma_att: TensorRef::new(&g, &[128]),
        z: TensorRef::new(&a, &[4, 2, 128]),
    };
    // out over o_att's memory: named, nothing launched.
    let mut o = unsafe { TensorMut::from_raw(inp.o_att.ptr(), a.len(), DType::Bf16, &[4, 2, 128], &[256, 128, 1]) };
    let e = merge::merge(&rt, &inp, &mut o).unwrap_err();
    assert_eq!(e.arg(), Some("out"), "{e}");
}
