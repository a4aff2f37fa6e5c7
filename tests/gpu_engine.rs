//! Tier 3, engine integration: runtimes over the caller's stream (cudarc and raw,
//! with a CUDA graph captured on it), device state indices with out-of-range
//! entries and a caller-provided workspace, and tensor parallelism: a head subset
//! (an uneven split of the routing heads, through strided head views and a row
//! slice of W_score) equals the same heads of the full call, for the router, the
//! GDN prefill and the sparse prefill. Skips with `skipped: no CUDA device`.

use cudarc::driver::{CudaSlice, CudaView};
use half::bf16;
use natsl::ops::gdn::*;
use natsl::ops::router::{route_into, RouterOptions, RouterOutput};
use natsl::ops::sparse::{self, BlockMask, SparseOptions};
use natsl::testing;
use natsl::{Batch, Runtime, Scratch, TensorMut, TensorRef};

type Routed = (Vec<u8>, Vec<i32>, Vec<i32>);

/// Router labels, lists and counts for `w` (`[2 * hr, d]` device view) on `rt`'s stream.
fn route(rt: &Runtime, batch: &Batch, x: &TensorRef, w: &TensorRef, hr: usize) -> Routed {
    let mut out = RouterOutput::alloc(rt, batch, hr, x.dim(1), false).unwrap();
    route_into(rt, batch, x, w, &RouterOptions::default(), &mut out).unwrap();
    rt.synchronize().unwrap();
    let s = rt.stream();
    (s.clone_dtoh(&out.labels).unwrap(), s.clone_dtoh(&out.attn_list).unwrap(), s.clone_dtoh(&out.attn_count).unwrap())
}

/// Columns `c0..c1` of a row-major `[rows, cols]` host matrix.
fn cols<T: Copy>(m: &[T], cols: usize, c0: usize, c1: usize) -> Vec<T> {
    m.chunks(cols).flat_map(|r| r[c0..c1].iter().copied()).collect()
}

struct Inputs {
    cu: Vec<i32>,
    t: usize,
    d: usize,
    x: CudaSlice<bf16>,
    w: CudaSlice<bf16>,
}

fn router_inputs(rt: &Runtime, lens: &[usize], d: usize, hr: usize, seed: u64) -> Inputs {
    let mut rng = testing::rng(seed);
    let cu = testing::cu_seqlens(lens);
    let t = *cu.last().unwrap() as usize;
    let x = testing::upload::<bf16>(rt, &testing::rand_vec(&mut rng, t * d, 1.0)).unwrap();
    let w = testing::upload::<bf16>(rt, &testing::rand_vec(&mut rng, 2 * hr * d, 0.05)).unwrap();
    Inputs { cu, t, d, x, w }
}

#[test]
fn runtimes_over_the_callers_stream_launch_there() {
    let Some(rt) = testing::gpu_or_skip("runtimes_over_the_callers_stream_launch_there") else { return };
    let hr = 4;
    let inp = router_inputs(&rt, &[300, 200], 256, hr, 1);
    let batch = Batch::new(&rt, &inp.cu).unwrap();
    let (x, w) = (TensorRef::new(&inp.x, &[inp.t, inp.d]), TensorRef::new(&inp.w, &[2 * hr, inp.d]));
    let want = route(&rt, &batch, &x, &w, hr);

    // The engine's own cudarc stream: a new runtime over it, and the first runtime's
    // cache on it; then the raw CUstream with the thread's current context (the C ABI's way).
    let engine = rt.context().new_stream().unwrap();
    let r1 = Runtime::from_stream(engine.clone()).unwrap();
    assert_eq!(r1.stream().cu_stream(), engine.cu_stream());
    assert_eq!(route(&r1, &batch, &x, &w, hr), want, "Runtime::from_stream");
    let r2 = rt.on_stream(engine.clone()).unwrap();
    assert_eq!(route(&r2, &batch, &x, &w, hr), want, "Runtime::on_stream");
    rt.context().bind_to_thread().unwrap();
    // SAFETY: the context is current and `engine` is its stream, alive for the test.
    let r3 = unsafe { Runtime::from_raw_stream(engine.cu_stream()) }.unwrap();
    assert_eq!(r3.stream().cu_stream(), engine.cu_stream());
    assert_eq!(route(&r3, &batch, &x, &w, hr), want, "Runtime::from_raw_stream");
    // SAFETY: as above.
    let r4 = unsafe { rt.on_raw_stream(engine.cu_stream()) }.unwrap();
    assert_eq!(route(&r4, &batch, &x, &w, hr), want, "Runtime::on_raw_stream");

    // Captured on the engine's stream: a graph exists only if natsl launched there.
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let mut out = RouterOutput::alloc(&r1, &batch, hr, inp.d, false).unwrap();
    route_into(&r1, &batch, &x, &w, &RouterOptions::default(), &mut out).unwrap();
    engine.memset_zeros(&mut out.labels).unwrap();
    engine.synchronize().unwrap();
    engine.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).unwrap();
    route_into(&r1, &batch, &x, &w, &RouterOptions::default(), &mut out).unwrap();
    let graph = engine.end_capture(CUgraphInstantiate_flags(0)).unwrap().expect("an empty capture: natsl did not launch on the caller's stream");
    graph.launch().unwrap();
    engine.synchronize().unwrap();
    assert_eq!(engine.clone_dtoh(&out.labels).unwrap(), want.0, "graph replay on the caller's stream");
    println!("router on the caller's stream (cudarc, shared cache, raw, graph): identical to the own stream");
}

/// GDN problem of the tensor-parallel and index tests: bf16, dk = dv = 128.
struct Gdn {
    cu: Vec<i32>,
    t: usize,
    hqk: usize,
    hv: usize,
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    g: CudaSlice<f32>,
    beta: CudaSlice<f32>,
}

const DK: usize = 128;
const DV: usize = 128;
/// q, k L2-normalised in the kernel: raw U(-1, 1) keys at dk 128 give beta |k|^2 ~ 20,
/// and the delta rule diverges (inf after ~200 tokens; seen on the H200).
const OPTS: GdnOptions = GdnOptions { scale: None, l2norm: true };

fn gdn_inputs(rt: &Runtime, lens: &[usize], hqk: usize, hv: usize, seed: u64) -> Gdn {
    let mut rng = testing::rng(seed);
    let cu = testing::cu_seqlens(lens);
    let t = *cu.last().unwrap() as usize;
    let up = |rng: &mut _, n, s| testing::upload::<bf16>(rt, &testing::rand_vec(rng, n, s)).unwrap();
    let q = up(&mut rng, t * hqk * DK, 1.0);
    let k = up(&mut rng, t * hqk * DK, 1.0);
    let v = up(&mut rng, t * hv * DV, 1.0);
    let g = testing::upload::<f32>(rt, &testing::rand_range(&mut rng, t * hv, -0.2, -0.01)).unwrap();
    let beta = testing::upload::<f32>(rt, &testing::rand_range(&mut rng, t * hv, 0.1, 0.9)).unwrap();
    Gdn { cu, t, hqk, hv, q, k, v, g, beta }
}

/// A `[t, h, d]` view of heads `h0..h0 + h` of a `[t, H, d]` buffer.
fn heads<'a, T: natsl::tensor::Element>(buf: &'a CudaView<'a, T>, t: usize, h: usize, big_h: usize, d: usize) -> TensorRef<'a> {
    TensorRef::strided(buf, &[t, h, d], &[big_h * d, d, 1])
}

#[test]
fn gdn_device_indices_skip_rows_outside_the_pool_and_use_the_callers_workspace() {
    let Some(rt) = testing::gpu_or_skip("gdn_device_indices_skip_rows_outside_the_pool_and_use_the_callers_workspace") else { return };
    let p = gdn_inputs(&rt, &[100, 230], 1, 2, 7);
    let (n, hv, t) = (2usize, p.hv, p.t);
    let batch = Batch::new(&rt, &p.cu).unwrap();
    let state = hv * DK * DV;
    let mut rng = testing::rng(8);
    // h0 pool of 3 rows, row 1 all zeros.
    let mut h0 = testing::rand_vec(&mut rng, 3 * state, 0.1);
    h0[state..2 * state].iter_mut().for_each(|x| *x = 0.0);
    let h0d = testing::upload::<f32>(&rt, &h0).unwrap();
    let run = |h0_index: PoolIndex, com_index: PoolIndex, com: &mut CudaSlice<f32>, ws: &mut GdnWorkspace| -> Vec<f64> {
        let mut od = testing::poisoned::<bf16>(&rt, t * hv * DV).unwrap();
        let inp = GdnPrefillInputs {
            q: TensorRef::new(&p.q, &[t, 1, DK]),
            k: TensorRef::new(&p.k, &[t, 1, DK]),
            v: TensorRef::new(&p.v, &[t, hv, DV]),
            g: TensorRef::new(&p.g, &[t, hv]),
            beta: TensorRef::new(&p.beta, &[t, hv]),
            labels: None,
            h0: Some(PoolIn { pool: TensorRef::new(&h0d, &[3, hv, DK, DV]), index: Some(h0_index) }),
        };
        let mut out = GdnPrefillOutputs { o: TensorMut::new(&mut od, &[t, hv, DV]), committed: Some(PoolOut { pool: TensorMut::new(com, &[2, hv, DK, DV]), index: Some(com_index) }), running: None, gsum_running: None };
        gdn_prefill(&rt, &batch, &inp, &mut out, &OPTS, ws).unwrap();
        drop(out);
        testing::download(&rt, &od).unwrap()
    };
    // Host indices: sequence 1 reads the zero row 1; committed rows 0 and 1.
    let mut com_host = testing::poisoned::<f32>(&rt, 2 * state).unwrap();
    let o_host = run(vec![2, 1].into(), vec![0, 1].into(), &mut com_host, &mut GdnWorkspace::new());
    // Device indices: -1 = no initial state (zeros), and committed row -1 = not written.
    let h0_ix = rt.stream().clone_htod(&[2i32, -1]).unwrap();
    let com_ix = rt.stream().clone_htod(&[-1i32, 1]).unwrap();
    let mut com_dev = testing::upload::<f32>(&rt, &vec![7.0; 2 * state]).unwrap();
    // The caller's workspace, exactly the size asked for.
    let h0_view = TensorRef::new(&h0_ix, &[n]);
    let com_view = TensorRef::new(&com_ix, &[n]);
    let bytes = {
        let fake_o = testing::fake_contiguous(natsl::DType::Bf16, &[t, hv, DV]);
        // SAFETY: only validated and sized, never dereferenced.
        let o = unsafe { TensorMut::from_raw(fake_o.ptr(), fake_o.numel(), natsl::DType::Bf16, &[t, hv, DV], fake_o.strides()) };
        let com = testing::fake_contiguous(natsl::DType::F32, &[2, hv, DK, DV]);
        // SAFETY: as above.
        let com = unsafe { TensorMut::from_raw(com.ptr(), com.numel(), natsl::DType::F32, &[2, hv, DK, DV], com.strides()) };
        let inp = GdnPrefillInputs {
            q: TensorRef::new(&p.q, &[t, 1, DK]),
            k: TensorRef::new(&p.k, &[t, 1, DK]),
            v: TensorRef::new(&p.v, &[t, hv, DV]),
            g: TensorRef::new(&p.g, &[t, hv]),
            beta: TensorRef::new(&p.beta, &[t, hv]),
            labels: None,
            h0: Some(PoolIn { pool: TensorRef::new(&h0d, &[3, hv, DK, DV]), index: Some(PoolIndex::Device(h0_view.clone())) }),
        };
        let out = GdnPrefillOutputs { o, committed: Some(PoolOut { pool: com, index: Some(PoolIndex::Device(com_view.clone())) }), running: None, gsum_running: None };
        prefill_workspace_bytes(&rt, &p.cu, &inp, &out, &OPTS).unwrap()
    };
    let mut ws = GdnWorkspace::from_scratch(Scratch::from_slice(rt.stream().alloc_zeros::<u8>(bytes).unwrap()));
    let o_dev = run(PoolIndex::Device(h0_view.clone()), PoolIndex::Device(com_view.clone()), &mut com_dev, &mut ws);
    assert_eq!(ws.scratch.bytes(), bytes, "natsl grew the caller's workspace");
    assert!(o_host.iter().all(|x| x.is_finite()), "o: non-finite with host indices");
    assert!(o_dev == o_host, "o: device indices (-1 = zero state) differ from host indices (zero row), rel err {:.2e}", testing::rel_err(&o_dev, &o_host));
    let (ch, cd) = (testing::download(&rt, &com_host).unwrap(), testing::download(&rt, &com_dev).unwrap());
    assert!(cd[..state].iter().all(|&x| x == 7.0), "committed row of index -1 was written");
    assert!(cd[state..] == ch[state..], "committed row 1 differs");
    // A workspace one byte short is refused, naming it, and nothing is allocated.
    let mut small = GdnWorkspace::from_scratch(Scratch::from_slice(rt.stream().alloc_zeros::<u8>(bytes - 1).unwrap()));
    let mut od = testing::poisoned::<bf16>(&rt, t * hv * DV).unwrap();
    let inp = GdnPrefillInputs {
        q: TensorRef::new(&p.q, &[t, 1, DK]),
        k: TensorRef::new(&p.k, &[t, 1, DK]),
        v: TensorRef::new(&p.v, &[t, hv, DV]),
        g: TensorRef::new(&p.g, &[t, hv]),
        beta: TensorRef::new(&p.beta, &[t, hv]),
        labels: None,
        h0: Some(PoolIn { pool: TensorRef::new(&h0d, &[3, hv, DK, DV]), index: Some(PoolIndex::Device(h0_view)) }),
    };
    let mut out = GdnPrefillOutputs { o: TensorMut::new(&mut od, &[t, hv, DV]), committed: Some(PoolOut { pool: TensorMut::new(&mut com_dev, &[2, hv, DK, DV]), index: Some(PoolIndex::Device(com_view)) }), running: None, gsum_running: None };
    let e = gdn_prefill(&rt, &batch, &inp, &mut out, &OPTS, &mut small).unwrap_err();
    assert_eq!(e.arg(), Some("workspace"), "{e}");
    println!("device indices (-1 entries) match host indices; caller workspace of {bytes} B used as is");
}

#[test]
fn tensor_parallel_head_subsets_equal_the_full_call() {
    let Some(rt) = testing::gpu_or_skip("tensor_parallel_head_subsets_equal_the_full_call") else { return };
    // 3 routing heads split unevenly over two "GPUs": {0, 1} and {2}.
    let hr = 3;
    let split = [(0usize, 2usize), (2, 3)];
    let inp = router_inputs(&rt, &[700, 333], 512, hr, 11);
    let batch = Batch::new(&rt, &inp.cu).unwrap();
    let (t, d, ns, nseq) = (inp.t, inp.d, batch.num_slots(), batch.num_seqs());
    let x = TensorRef::new(&inp.x, &[t, d]);
    let full = route(&rt, &batch, &x, &TensorRef::new(&inp.w, &[2 * hr, d]), hr);

    // Router: a row slice of W_score (head r owns rows 2r, 2r + 1).
    for &(r0, r1) in &split {
        let w_rows = inp.w.slice(2 * r0 * d..2 * r1 * d);
        let sub = route(&rt, &batch, &x, &TensorRef::new(&w_rows, &[2 * (r1 - r0), d]), r1 - r0);
        assert_eq!(sub.0, cols(&full.0, hr, r0, r1), "labels of routing heads {r0}..{r1}");
        assert_eq!(sub.1, full.1[r0 * ns..r1 * ns].to_vec(), "attn_list rows {r0}..{r1}");
        assert_eq!(sub.2, cols(&full.2, hr, r0, r1), "attn_count of heads {r0}..{r1}");
    }

    // GDN: Hqk 3, Hv 6 (2 value heads per routing head and per q/k head).
    let (hqk, hv) = (3usize, 6usize);
    let g = gdn_inputs(&rt, &[700, 333], hqk, hv, 12);
    let labels_full = rt.stream().clone_htod(&full.0).unwrap();
    let gdn_run = |qk: (usize, usize), vh: (usize, usize), labels: &CudaSlice<u8>, nr: usize| -> (Vec<f64>, Vec<f64>) {
        let (nqk, nv) = (qk.1 - qk.0, vh.1 - vh.0);
        let qv = g.q.slice(qk.0 * DK..);
        let kv = g.k.slice(qk.0 * DK..);
        let vv = g.v.slice(vh.0 * DV..);
        let gv = g.g.slice(vh.0..);
        let bv = g.beta.slice(vh.0..);
        let mut od = testing::poisoned::<bf16>(&rt, t * nv * DV).unwrap();
        let mut run = testing::poisoned::<f32>(&rt, nseq * nv * DK * DV).unwrap();
        let i = GdnPrefillInputs {
            q: heads(&qv, t, nqk, g.hqk, DK),
            k: heads(&kv, t, nqk, g.hqk, DK),
            v: heads(&vv, t, nv, g.hv, DV),
            g: TensorRef::strided(&gv, &[t, nv], &[g.hv, 1]),
            beta: TensorRef::strided(&bv, &[t, nv], &[g.hv, 1]),
            labels: Some(TensorRef::new(labels, &[ns, nr])),
            h0: None,
        };
        let mut o = GdnPrefillOutputs { o: TensorMut::new(&mut od, &[t, nv, DV]), committed: None, running: Some(PoolOut { pool: TensorMut::new(&mut run, &[nseq, nv, DK, DV]), index: None }), gsum_running: None };
        gdn_prefill(&rt, &batch, &i, &mut o, &GdnOptions { scale: None, l2norm: true }, &mut GdnWorkspace::new()).unwrap();
        drop(o);
        (testing::download(&rt, &od).unwrap(), testing::download(&rt, &run).unwrap())
    };
    let (o_full, s_full) = gdn_run((0, hqk), (0, hv), &labels_full, hr);
    for &(r0, r1) in &split {
        let (v0, v1) = (r0 * hv / hr, r1 * hv / hr);
        let (k0, k1) = (v0 * hqk / hv, v1 * hqk / hv);
        let lab = rt.stream().clone_htod(&cols(&full.0, hr, r0, r1)).unwrap();
        let (o, s) = gdn_run((k0, k1), (v0, v1), &lab, r1 - r0);
        let o_want = cols(&o_full, hv * DV, v0 * DV, v1 * DV);
        let s_want = cols(&s_full, hv * DK * DV, v0 * DK * DV, v1 * DK * DV);
        // Fewer heads can pick another scan tile or context parallelism: same math,
        // another f32 summation order.
        testing::assert_close(&format!("GDN o, value heads {v0}..{v1}"), &o, &o_want, 1e-2);
        testing::assert_close(&format!("GDN running state, value heads {v0}..{v1}"), &s, &s_want, 1e-3);
    }

    // Sparse prefill: Hq 12, Hkv 6 (4 query and 2 kv heads per routing head), 64/128.
    let (hq, hkv, dk, dv) = (12usize, 6usize, 64usize, 128usize);
    let mut rng = testing::rng(13);
    let q = testing::upload::<bf16>(&rt, &testing::rand_vec(&mut rng, t * hq * dk, 1.0)).unwrap();
    let k = testing::upload::<bf16>(&rt, &testing::rand_vec(&mut rng, t * hkv * dk, 1.0)).unwrap();
    let v = testing::upload::<bf16>(&rt, &testing::rand_vec(&mut rng, t * hkv * dv, 1.0)).unwrap();
    let list_full = rt.stream().clone_htod(&full.1).unwrap();
    let sparse_run = |r0: usize, r1: usize, count: &CudaSlice<i32>| -> Vec<f64> {
        let (q0, q1, g0, g1) = (r0 * hq / hr, r1 * hq / hr, r0 * hkv / hr, r1 * hkv / hr);
        let (qv, kv, vv) = (q.slice(q0 * dk..), k.slice(g0 * dk..), v.slice(g0 * dv..));
        let list = list_full.slice(r0 * ns..r1 * ns);
        let mut od = testing::poisoned::<bf16>(&rt, t * (q1 - q0) * dv).unwrap();
        let mask = BlockMask::Routed { attn_list: TensorRef::new(&list, &[r1 - r0, ns]), attn_count: TensorRef::new(count, &[nseq, r1 - r0]) };
        let mut o = TensorMut::new(&mut od, &[t, q1 - q0, dv]);
        sparse::prefill(&rt, &batch, &heads(&qv, t, q1 - q0, hq, dk), &heads(&kv, t, g1 - g0, hkv, dk), &heads(&vv, t, g1 - g0, hkv, dv), &mask, &SparseOptions::default(), &mut o, None).unwrap();
        drop(o);
        testing::download(&rt, &od).unwrap()
    };
    let o_full = sparse_run(0, hr, &rt.stream().clone_htod(&full.2).unwrap());
    for &(r0, r1) in &split {
        let o = sparse_run(r0, r1, &rt.stream().clone_htod(&cols(&full.2, hr, r0, r1)).unwrap());
        let want = cols(&o_full, hq * dv, r0 * hq / hr * dv, r1 * hq / hr * dv);
        // Each CTA computes one (chunk, sequence, query head) alone: expected bitwise equal.
        println!("sparse heads of routing heads {r0}..{r1}: bitwise equal {}", o == want);
        testing::assert_close(&format!("sparse o, routing heads {r0}..{r1}"), &o, &want, 1e-3);
    }
}
