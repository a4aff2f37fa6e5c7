//! Tier 3: the layer prefill (`natsl::layer::prefill`: router -> GDN || sparse softmax
//! -> merge) against the f64 reference of the whole layer (SPEC.md sections 3-6 and 8)
//! on random non-zero inputs, ragged batches with lengths that are not multiples of 64,
//! every output poisoned before the launch. The reference runs after the router on the
//! device's labels (`reference::layer_branches`), so a near-tie label flip (reported,
//! bounded) cannot throw off the check of the rest. Skips with `skipped: no CUDA device`
//! without a GPU.

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use natsl::layer::{self, PrefillInputs, PrefillOptions, PrefillOutputs, PrefillWorkspace, Streams};
use natsl::ops::gdn::{PoolIndex, PoolOut};
use natsl::ops::router::RouterPolicy;
use natsl::reference as r;
use natsl::tensor::Element;
use natsl::testing::{self, TestElem};
use natsl::{Arch, Batch, Runtime, Scratch, TensorMut, TensorRef};

#[derive(Clone, Copy, Debug)]
struct Dims {
    d: usize,
    h: usize,
    dk: usize,
    dv: usize,
    ha: usize,
}

impl Dims {
    fn dks(&self) -> usize {
        self.h * self.dk / self.ha
    }
    fn dvs(&self) -> usize {
        self.h * self.dv / self.ha
    }
    fn reference(&self) -> r::NatslDims {
        r::NatslDims { d_model: self.d, h: self.h, dk: self.dk, dv: self.dv, ha: self.ha, dks: self.dks(), dvs: self.dvs() }
    }
}

const M340: Dims = Dims { d: 1024, h: 6, dk: 128, dv: 256, ha: 12 };
const M760: Dims = Dims { d: 1536, h: 6, dk: 192, dv: 384, ha: 18 };

#[derive(Clone, Debug)]
struct Case {
    dims: Dims,
    lens: Vec<usize>,
    policy: RouterPolicy,
    /// q, k, v and z as strided views of one packed projection output (else each its own
    /// contiguous buffer), and the layer output inside a padded buffer whose padding must
    /// stay poisoned.
    packed: bool,
    /// The router outputs, both state pools (through a host index over a larger pool)
    /// and gsum_running given; without them the call runs a second time with them (the
    /// same output, bit for bit) to read the labels.
    caller_outputs: bool,
    /// q / k RMSNorm weights on the softmax path and explicit scales.
    norms: bool,
    w_f32: bool,
}

/// Host inputs of one case (already rounded to what the device sees).
struct Host {
    cu: Vec<i32>,
    t: usize,
    x: Vec<f64>,
    w_score: Vec<f64>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    g: Vec<f64>,
    beta: Vec<f64>,
    w: Vec<f64>,
    z: Vec<f64>,
    gamma_gdn: Vec<f64>,
    gamma_att: Vec<f64>,
    q_norm_w: Vec<f64>,
    k_norm_w: Vec<f64>,
}

fn host<T: TestElem>(c: &Case, seed: u64) -> Host {
    let mut rng = testing::rng(seed);
    let d = c.dims;
    let cu = testing::cu_seqlens(&c.lens);
    let t = *cu.last().unwrap() as usize;
    let q = testing::quantize::<T>;
    Host {
        x: q(&testing::rand_vec(&mut rng, t * d.d, 1.0)),
        w_score: q(&testing::rand_vec(&mut rng, 2 * d.h * d.d, 0.05)),
        q: q(&testing::rand_vec(&mut rng, t * d.h * d.dk, 1.0)),
        k: q(&testing::rand_vec(&mut rng, t * d.h * d.dk, 1.0)),
        v: q(&testing::rand_vec(&mut rng, t * d.h * d.dv, 1.0)),
        // Log-decays in [-0.2, -0.005] (f32), betas in (0, 1) (f32).
        g: testing::rand_range(&mut rng, t * d.h, -0.2, -0.005).iter().map(|&x| x as f32 as f64).collect(),
        beta: testing::rand_range(&mut rng, t * d.h, 0.05, 0.95).iter().map(|&x| x as f32 as f64).collect(),
        w: {
            let w = testing::rand_vec(&mut rng, t * d.ha * 2, 3.0);
            if c.w_f32 { w.iter().map(|&x| x as f32 as f64).collect() } else { q(&w) }
        },
        z: q(&testing::rand_vec(&mut rng, t * d.ha * d.dvs(), 3.0)),
        gamma_gdn: q(&testing::rand_range(&mut rng, d.dvs(), 0.5, 1.5)),
        gamma_att: q(&testing::rand_range(&mut rng, d.dvs(), 0.5, 1.5)),
        q_norm_w: q(&testing::rand_range(&mut rng, d.dks(), 0.5, 1.5)),
        k_norm_w: q(&testing::rand_range(&mut rng, d.dks(), 0.5, 1.5)),
        cu,
        t,
    }
}

/// A view of `buf` from element `off` on, not borrowing it (the buffers outlive the calls).
fn view<T: Element>(buf: &CudaSlice<T>, off: usize, shape: &[usize], strides: &[usize]) -> TensorRef<'static> {
    let s = buf.slice(off..);
    let v = TensorRef::strided(&s, shape, strides);
    // SAFETY: the same memory, shape and strides as `v`, used while `buf` lives.
    unsafe { TensorRef::from_raw(v.ptr(), v.avail(), v.dtype(), v.shape(), v.strides()) }
}
fn view_mut<T: Element>(buf: &CudaSlice<T>, off: usize, shape: &[usize], strides: &[usize]) -> TensorMut<'static> {
    let v = view(buf, off, shape, strides);
    // SAFETY: as above; each output buffer is written by one call at a time.
    unsafe { TensorMut::from_raw(v.ptr(), v.avail(), v.dtype(), v.shape(), v.strides()) }
}
fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len() - 1).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Host `[t, width]` rows into columns `[col, col + width)` of `[t, row]` rows.
fn place(dst: &mut [f64], src: &[f64], t: usize, row: usize, col: usize, width: usize) {
    for i in 0..t {
        dst[i * row + col..i * row + col + width].copy_from_slice(&src[i * width..(i + 1) * width]);
    }
}

/// The device side of one case: inputs, outputs (poisoned) and the views over them.
struct Dev<T: TestElem + Element> {
    bufs: Vec<CudaSlice<T>>,
    f32s: Vec<CudaSlice<f32>>,
    out: CudaSlice<T>,
    /// (offset, token stride) of the layer output inside `out`.
    out_at: (usize, usize),
    labels: CudaSlice<u8>,
    list: CudaSlice<i32>,
    count: CudaSlice<i32>,
    committed: CudaSlice<f32>,
    running: CudaSlice<f32>,
    gsum: CudaSlice<f32>,
    inp: PrefillInputs<'static>,
    /// Committed pool rows per sequence (a permutation inside a larger pool).
    rows: Vec<i32>,
}

fn upload<T: TestElem + Element>(rt: &Runtime, c: &Case, hs: &Host) -> Dev<T> {
    let d = c.dims;
    let (t, n) = (hs.t, c.lens.len());
    let dvs = d.dvs();
    let up = |x: &[f64]| testing::upload::<T>(rt, x).unwrap();
    let mut bufs = Vec::new();
    let (q, k, v, z);
    if c.packed {
        // One projection row: q | k | v | z | 64 columns of padding.
        let (cq, ck, cv, cz) = (0, d.h * d.dk, 2 * d.h * d.dk, 2 * d.h * d.dk + d.h * d.dv);
        let row = cz + d.ha * dvs + 64;
        let mut p = vec![7.0; t * row];
        place(&mut p, &hs.q, t, row, cq, d.h * d.dk);
        place(&mut p, &hs.k, t, row, ck, d.h * d.dk);
        place(&mut p, &hs.v, t, row, cv, d.h * d.dv);
        place(&mut p, &hs.z, t, row, cz, d.ha * dvs);
        bufs.push(up(&p));
        let b = &bufs[0];
        q = view(b, cq, &[t, d.h, d.dk], &[row, d.dk, 1]);
        k = view(b, ck, &[t, d.h, d.dk], &[row, d.dk, 1]);
        v = view(b, cv, &[t, d.h, d.dv], &[row, d.dv, 1]);
        z = view(b, cz, &[t, d.ha, dvs], &[row, dvs, 1]);
    } else {
        for x in [&hs.q, &hs.k, &hs.v, &hs.z] {
            bufs.push(up(x));
        }
        q = view(&bufs[0], 0, &[t, d.h, d.dk], &contiguous(&[t, d.h, d.dk]));
        k = view(&bufs[1], 0, &[t, d.h, d.dk], &contiguous(&[t, d.h, d.dk]));
        v = view(&bufs[2], 0, &[t, d.h, d.dv], &contiguous(&[t, d.h, d.dv]));
        z = view(&bufs[3], 0, &[t, d.ha, dvs], &contiguous(&[t, d.ha, dvs]));
    }
    for x in [&hs.x, &hs.w_score, &hs.gamma_gdn, &hs.gamma_att, &hs.q_norm_w, &hs.k_norm_w] {
        bufs.push(up(x));
    }
    let nb = bufs.len();
    let f32s: Vec<CudaSlice<f32>> = [&hs.g, &hs.beta, &hs.w].iter().map(|x| testing::upload::<f32>(rt, x).unwrap()).collect();
    let wt = if c.w_f32 { None } else { Some(up(&hs.w)) };
    let w = match &wt {
        Some(b) => view(b, 0, &[t, d.ha, 2], &[2 * d.ha, 2, 1]),
        None => view(&f32s[2], 0, &[t, d.ha, 2], &[2 * d.ha, 2, 1]),
    };
    if let Some(b) = wt {
        bufs.push(b);
    }
    let inp = PrefillInputs {
        q,
        k,
        v,
        g: view(&f32s[0], 0, &[t, d.h], &[d.h, 1]),
        beta: view(&f32s[1], 0, &[t, d.h], &[d.h, 1]),
        x: view(&bufs[nb - 6], 0, &[t, d.d], &[d.d, 1]),
        w_score: view(&bufs[nb - 5], 0, &[2 * d.h, d.d], &[d.d, 1]),
        w,
        gamma_gdn: view(&bufs[nb - 4], 0, &[dvs], &[1]),
        gamma_att: view(&bufs[nb - 3], 0, &[dvs], &[1]),
        z,
    };
    let ns = r::num_slots(t, n);
    let out_at = if c.packed { (8, d.ha * dvs + 24) } else { (0, d.ha * dvs) };
    let out = testing::poisoned::<T>(rt, out_at.0 + t * out_at.1 + 8).unwrap();
    let sd = d.h * d.dk * d.dv;
    // Pool rows: sequence i -> row (n - 1 - i) + 1 of n + 2 rows (row 0 and the last stay poisoned).
    let rows: Vec<i32> = (0..n).map(|i| (n - i) as i32).collect();
    Dev {
        bufs,
        f32s,
        out,
        out_at,
        labels: testing::poisoned::<u8>(rt, ns * d.h).unwrap(),
        list: testing::poisoned::<i32>(rt, ns * d.h).unwrap(),
        count: testing::poisoned::<i32>(rt, n * d.h).unwrap(),
        committed: testing::poisoned::<f32>(rt, (n + 2) * sd).unwrap(),
        running: testing::poisoned::<f32>(rt, n * sd).unwrap(),
        gsum: testing::poisoned::<f32>(rt, n * d.h).unwrap(),
        inp,
        rows,
    }
}

impl<T: TestElem + Element> Dev<T> {
    fn outputs(&self, c: &Case, t: usize, with: bool) -> PrefillOutputs<'static> {
        let d = c.dims;
        let n = c.lens.len();
        let ns = r::num_slots(t, n);
        let o = view_mut(&self.out, self.out_at.0, &[t, d.ha, d.dvs()], &[self.out_at.1, d.dvs(), 1]);
        let mut out = PrefillOutputs::new(o);
        if with {
            out.labels = Some(view_mut(&self.labels, 0, &[ns, d.h], &[d.h, 1]));
            out.attn_list = Some(view_mut(&self.list, 0, &[d.h, ns], &[ns, 1]));
            out.attn_count = Some(view_mut(&self.count, 0, &[n, d.h], &[d.h, 1]));
            let ps = [d.h * d.dk * d.dv, d.dk * d.dv, d.dv, 1];
            out.committed = Some(PoolOut { pool: view_mut(&self.committed, 0, &[n + 2, d.h, d.dk, d.dv], &ps), index: Some(PoolIndex::Host(self.rows.clone())) });
            out.running = Some(PoolOut { pool: view_mut(&self.running, 0, &[n, d.h, d.dk, d.dv], &ps), index: None });
            out.gsum_running = Some(view_mut(&self.gsum, 0, &[n, d.h], &[d.h, 1]));
        }
        out
    }

    /// The layer output as `[t, ha * dvs]`, after checking the padding around it is poison.
    fn read_out(&self, rt: &Runtime, c: &Case, t: usize, what: &str) -> Vec<f64> {
        let raw = testing::download(rt, &self.out).unwrap();
        let w = c.dims.ha * c.dims.dvs();
        let mut got = Vec::with_capacity(t * w);
        let mut inside = vec![false; raw.len()];
        for i in 0..t {
            let b = self.out_at.0 + i * self.out_at.1;
            got.extend_from_slice(&raw[b..b + w]);
            inside[b..b + w].iter_mut().for_each(|x| *x = true);
        }
        if let Some(i) = raw.iter().zip(&inside).position(|(x, &ins)| !ins && !x.is_nan()) {
            panic!("{what}: wrote element {i}, outside out's view");
        }
        got
    }
}

fn options(c: &Case, hs_dev: &Dev<impl TestElem + Element>, streams: Streams) -> PrefillOptions<'static> {
    let mut o = PrefillOptions { streams, ..Default::default() };
    o.router.policy = c.policy;
    if c.norms {
        let nb = hs_dev.bufs.len() - if c.w_f32 { 0 } else { 1 };
        o.sparse.q_norm_w = Some(view(&hs_dev.bufs[nb - 2], 0, &[c.dims.dks()], &[1]));
        o.sparse.k_norm_w = Some(view(&hs_dev.bufs[nb - 1], 0, &[c.dims.dks()], &[1]));
        o.sparse.scale = Some(0.11);
        o.gdn.scale = Some(0.07);
    }
    o
}

fn ref_policy(p: RouterPolicy) -> r::RouterPolicy {
    match p {
        RouterPolicy::Argmax => r::RouterPolicy::Argmax,
        RouterPolicy::TopK(k) => r::RouterPolicy::TopK(k),
        RouterPolicy::KeepFraction(f) => r::RouterPolicy::KeepFraction(f as f64),
    }
}

/// Labels of used slots: exact except near ties (the rule of tests/gpu_router.rs);
/// returns the number of flips.
fn check_labels(c: &Case, hs: &Host, rref: &r::RouterOutput, labels: &[u8], list: &[i32], count: &[i32], what: &str) -> usize {
    let h = c.dims.h;
    let ns = r::num_slots(hs.t, c.lens.len());
    let mut flips = 0;
    for (n, &len) in c.lens.iter().enumerate() {
        let base = r::slot_base(&hs.cu, n);
        let complete = len / 64;
        for hh in 0..h {
            let lg = |cc: usize| (rref.logits[((base + cc) * h + hh) * 2], rref.logits[((base + cc) * h + hh) * 2 + 1]);
            let mut margins: Vec<f64> = (0..complete).map(|cc| lg(cc).0 - lg(cc).1).collect();
            margins.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let k = match ref_policy(c.policy) {
                r::RouterPolicy::Argmax => None,
                r::RouterPolicy::TopK(k) => Some(k.min(complete)),
                r::RouterPolicy::KeepFraction(f) => Some(r::keep_fraction_k(f, complete).min(complete)),
            };
            let threshold = match k {
                None => 0.0,
                Some(0) => f64::INFINITY,
                Some(k) => margins[k - 1],
            };
            for cc in 0..r::n_chunks(len) {
                let i = (base + cc) * h + hh;
                if labels[i] != rref.labels[i] {
                    let (l0, l1) = lg(cc);
                    let noise = 2e-3 * (l0.abs() + l1.abs()) + 1e-5;
                    assert!(cc < complete && (l0 - l1 - threshold).abs() <= noise, "{what}: label seq {n} head {hh} chunk {cc}: gpu {} ref {} (margin {:.3e}, threshold {threshold:.3e})", labels[i], rref.labels[i], l0 - l1);
                    flips += 1;
                }
            }
            if let Some(k) = k {
                assert_eq!(count[n * h + hh] as usize, k, "{what}: top-k count seq {n} head {hh}");
            }
        }
    }
    let (le, ce) = r::attn_list_from_labels(labels, &hs.cu, h);
    assert_eq!(count, &ce[..], "{what}: attn_count vs the device labels");
    for n in 0..c.lens.len() {
        for hh in 0..h {
            let s = hh * ns + r::slot_base(&hs.cu, n);
            let k = count[n * h + hh] as usize;
            assert_eq!(list[s..s + k], le[s..s + k], "{what}: attn_list seq {n} head {hh}");
        }
    }
    flips
}

/// The device labels with slots no chunk uses (never written) set to 0.
fn used_labels(c: &Case, hs: &Host, raw: &[u8]) -> Vec<u8> {
    let h = c.dims.h;
    let mut v = vec![0u8; raw.len()];
    for (n, &len) in c.lens.iter().enumerate() {
        let b = r::slot_base(&hs.cu, n) * h;
        let e = b + r::n_chunks(len) * h;
        v[b..e].copy_from_slice(&raw[b..e]);
    }
    v
}

/// Run `c` on `rt` and check everything it writes; returns the label flips.
fn check<T: TestElem + Element>(rt: &Runtime, c: &Case, hs: &Host, round: fn(f64) -> f64) -> usize {
    let what = format!("layer {:?} {:?} {:?} lens {:?} {:?}", T::DTYPE, rt.arch(), c.dims, c.lens, c.policy);
    let d = c.dims;
    let (t, n) = (hs.t, c.lens.len());
    let batch = Batch::new(rt, &hs.cu).unwrap();
    let dev = upload::<T>(rt, c, hs);
    let mut ws = PrefillWorkspace::new();
    let opts = options(c, &dev, Streams::Two);
    let mut out = dev.outputs(c, t, c.caller_outputs);
    layer::prefill(rt, &batch, &dev.inp, &mut out, &opts, &mut ws).unwrap_or_else(|e| panic!("{what}: {e}"));
    rt.synchronize().unwrap();
    let got = dev.read_out(rt, c, t, &what);
    if !c.caller_outputs {
        // Again with the router and state outputs (to read them), and on one stream:
        // the same output bit for bit (every kernel is deterministic).
        let o1 = PrefillOptions { streams: Streams::One, ..options(c, &dev, Streams::One) };
        let mut out = dev.outputs(c, t, true);
        layer::prefill(rt, &batch, &dev.inp, &mut out, &o1, &mut ws).unwrap_or_else(|e| panic!("{what} (one stream): {e}"));
        rt.synchronize().unwrap();
        let again = dev.read_out(rt, c, t, &what);
        let same = got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{what}: two streams without router outputs and one stream with them differ");
    }
    let labels_raw: Vec<u8> = rt.stream().clone_dtoh(&dev.labels).unwrap();
    let list: Vec<i32> = rt.stream().clone_dtoh(&dev.list).unwrap();
    let count: Vec<i32> = rt.stream().clone_dtoh(&dev.count).unwrap();
    let labels = used_labels(c, hs, &labels_raw);

    // The reference: its own router (for the flip count), then everything after the router
    // on the device's labels.
    let rref = r::router(&hs.x, &hs.w_score, &hs.cu, d.d, d.h, ref_policy(c.policy), round);
    let flips = check_labels(c, hs, &rref, &labels, &list, &count, &what);
    let layer_ref = r::NatslLayer {
        dims: d.reference(),
        w_score: &hs.w_score,
        gamma_gdn: &hs.gamma_gdn,
        gamma_att: &hs.gamma_att,
        q_norm_w: c.norms.then_some(&hs.q_norm_w[..]),
        k_norm_w: c.norms.then_some(&hs.k_norm_w[..]),
        l2norm: true,
        gdn_scale: c.norms.then_some(0.07f32 as f64),
        att_scale: c.norms.then_some(0.11f32 as f64),
        round,
    };
    let li = r::LayerInputs { x: &hs.x, q: &hs.q, k: &hs.k, v: &hs.v, g: &hs.g, beta: &hs.beta, w: &hs.w, z: &hs.z };
    let want = r::layer_branches(&layer_ref, &li, &hs.cu, &labels);
    let tol = testing::tolerance(T::DTYPE);
    testing::assert_close(&format!("{what}: out"), &got, &want.out, tol);

    // Final GDN states: the committed pool's rows by the host index, the others poison.
    let sd = d.h * d.dk * d.dv;
    let pool = testing::download(rt, &dev.committed).unwrap();
    assert!(pool[..sd].iter().chain(&pool[(n + 1) * sd..]).all(|x| x.is_nan()), "{what}: committed rows outside the index were written");
    let committed: Vec<f64> = (0..n).flat_map(|i| pool[dev.rows[i] as usize * sd..(dev.rows[i] as usize + 1) * sd].to_vec()).collect();
    testing::assert_close(&format!("{what}: committed"), &committed, &want.gdn.state_committed, tol);
    let running = testing::download(rt, &dev.running).unwrap();
    testing::assert_close(&format!("{what}: running"), &running, &want.gdn.state_running, tol);
    let gsum = testing::download(rt, &dev.gsum).unwrap();
    testing::assert_close(&format!("{what}: gsum_running"), &gsum, &want.gdn.gsum_running, 1e-5);
    let attn = labels.iter().filter(|&&l| l == r::LABEL_ATTN).count();
    println!("{what}: {attn} ATTN chunk-heads, {flips} near-tie flips");
    let _ = (&dev.bufs, &dev.f32s);
    flips
}

fn both_arches(f: impl Fn(&Runtime)) {
    let Some(rt) = testing::gpu_or_skip("gpu_layer") else { return };
    f(&rt);
    if rt.arch() != Arch::Sm80 {
        let rt80 = Runtime::with_arch(0, Arch::Sm80).unwrap();
        f(&rt80);
    }
}

/// A ragged batch with none of the long lengths a multiple of 64, one of exactly 64 and
/// one of a single token.
const RAGGED: [usize; 5] = [700, 1000, 64, 301, 1];

#[test]
fn prefill_340m_packed_projection_caller_outputs() {
    let c = Case { dims: M340, lens: RAGGED.to_vec(), policy: RouterPolicy::Argmax, packed: true, caller_outputs: true, norms: false, w_f32: true };
    let hs = host::<bf16>(&c, 1);
    both_arches(|rt| {
        check::<bf16>(rt, &c, &hs, r::round_bf16);
    });
}

#[test]
fn prefill_340m_keep_fraction_workspace_router_outputs() {
    // Router outputs in the workspace; checked against a second call that writes them
    // (one stream), logits in bf16.
    let c = Case { dims: M340, lens: vec![1000, 130, 777], policy: RouterPolicy::KeepFraction(0.25), packed: false, caller_outputs: false, norms: false, w_f32: false };
    let hs = host::<bf16>(&c, 2);
    both_arches(|rt| {
        check::<bf16>(rt, &c, &hs, r::round_bf16);
    });
}

#[test]
fn prefill_f16_small_heads_norms_and_scales() {
    // 2 GDN heads of 128 / 128 as 4 softmax heads of 64 / 64, q / k RMSNorm, scales given.
    let c = Case { dims: Dims { d: 256, h: 2, dk: 128, dv: 128, ha: 4 }, lens: vec![130, 77, 255], policy: RouterPolicy::TopK(1), packed: true, caller_outputs: true, norms: true, w_f32: true };
    let hs = host::<f16>(&c, 3);
    both_arches(|rt| {
        check::<f16>(rt, &c, &hs, r::round_f16);
    });
}

#[test]
fn prefill_one_softmax_head_per_gdn_head() {
    // Ha = H (64 / 64 both ways): the softmax reads q, k, v as the GDN does.
    let c = Case { dims: Dims { d: 512, h: 4, dk: 64, dv: 64, ha: 4 }, lens: vec![65, 400], policy: RouterPolicy::Argmax, packed: true, caller_outputs: false, norms: false, w_f32: true };
    let hs = host::<bf16>(&c, 4);
    both_arches(|rt| {
        check::<bf16>(rt, &c, &hs, r::round_bf16);
    });
}

#[test]
fn prefill_760m_dims() {
    let c = Case { dims: M760, lens: vec![300, 190], policy: RouterPolicy::Argmax, packed: true, caller_outputs: true, norms: false, w_f32: true };
    let hs = host::<bf16>(&c, 5);
    both_arches(|rt| {
        check::<bf16>(rt, &c, &hs, r::round_bf16);
    });
}

#[test]
fn prefill_small_for_the_sanitizer() {
    // Small enough for compute-sanitizer: both stream modes, the caller's outputs.
    let c = Case { dims: M340, lens: vec![129, 64, 5], policy: RouterPolicy::Argmax, packed: true, caller_outputs: true, norms: false, w_f32: true };
    let hs = host::<bf16>(&c, 6);
    let Some(rt) = testing::gpu_or_skip("gpu_layer") else { return };
    check::<bf16>(&rt, &c, &hs, r::round_bf16);
    let c = Case { caller_outputs: false, ..c };
    check::<bf16>(&rt, &c, &hs, r::round_bf16);
}

#[test]
fn prefill_captured_in_a_cuda_graph_on_the_callers_workspace() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let Some(rt) = testing::gpu_or_skip("gpu_layer") else { return };
    let c = Case { dims: M340, lens: vec![257, 64, 1000], policy: RouterPolicy::KeepFraction(0.5), packed: true, caller_outputs: true, norms: false, w_f32: true };
    let hs = host::<bf16>(&c, 7);
    let t = hs.t;
    let batch = Batch::new(&rt, &hs.cu).unwrap();
    let mut dev = upload::<bf16>(&rt, &c, &hs);
    let opts = options(&c, &dev, Streams::Two);
    // Device pool indices (a host index is a host-to-device copy, not capturable).
    let rows_dev = rt.stream().clone_htod(&dev.rows).unwrap();
    let outputs = || {
        let mut o = dev.outputs(&c, t, true);
        o.committed.as_mut().unwrap().index = Some(PoolIndex::Device(view(&rows_dev, 0, &[c.lens.len()], &[1])));
        o
    };
    // The caller's workspace of exactly the size asked for; one byte less is refused.
    let bytes = layer::prefill_workspace_bytes(&rt, &hs.cu, &dev.inp, &outputs(), &opts).unwrap();
    let buf = rt.stream().alloc_zeros::<u8>(bytes).unwrap();
    let mut small = PrefillWorkspace::from_scratch(unsafe { Scratch::from_raw(view(&buf, 0, &[bytes], &[1]).ptr(), bytes - 256) });
    let e = layer::prefill(&rt, &batch, &dev.inp, &mut outputs(), &opts, &mut small).unwrap_err();
    assert_eq!(e.arg(), Some("workspace"), "{e}");
    // A workspace over the layer output is refused.
    let mut over = PrefillWorkspace::from_scratch(unsafe { Scratch::from_raw(view(&dev.out, 0, &[1], &[1]).ptr(), bytes) });
    let e = layer::prefill(&rt, &batch, &dev.inp, &mut outputs(), &opts, &mut over).unwrap_err();
    assert_eq!(e.arg(), Some("workspace"), "{e}");

    let mut ws = PrefillWorkspace::from_scratch(Scratch::from_slice(buf));
    // A capture before the second stream exists is refused (nothing created inside it).
    let s = rt.stream();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let e = layer::prefill(&rt, &batch, &dev.inp, &mut outputs(), &opts, &mut ws).unwrap_err();
    let _ = s.end_capture(CUgraphInstantiate_flags(0));
    assert_eq!(e.arg(), Some("workspace"), "{e}");
    ws.prepare(&rt).unwrap();
    // Direct call (loads the units), then the same call captured and replayed twice over
    // poisoned outputs: the same bits.
    layer::prefill(&rt, &batch, &dev.inp, &mut outputs(), &opts, &mut ws).unwrap();
    rt.synchronize().unwrap();
    let direct = dev.read_out(&rt, &c, t, "direct");
    let direct_state = testing::download(&rt, &dev.committed).unwrap();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let r = layer::prefill(&rt, &batch, &dev.inp, &mut outputs(), &opts, &mut ws);
    let g = s.end_capture(CUgraphInstantiate_flags(0)).unwrap().expect("a graph");
    r.unwrap();
    for rep in 0..2 {
        // Poison the output buffer the graph writes, in place.
        rt.stream().memcpy_htod(&vec![bf16::NAN; dev.out.len()], &mut dev.out).unwrap();
        g.launch().unwrap();
        rt.synchronize().unwrap();
        let replay = dev.read_out(&rt, &c, t, "replay");
        assert!(replay.iter().zip(&direct).all(|(a, b)| a.to_bits() == b.to_bits()), "replay {rep} differs from the direct call");
    }
    assert_eq!(testing::download(&rt, &dev.committed).unwrap().iter().zip(&direct_state).filter(|(a, b)| a.to_bits() != b.to_bits()).count(), 0);
    let faults = rt.device_faults().unwrap();
    assert!(faults.is_empty(), "device faults: {faults:?}");
}
