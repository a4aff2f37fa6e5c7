//! Tier 1 (no GPU): every malformed argument of the layer prefill is rejected with
//! `Error::InvalidArgument` naming the argument, before anything is launched; the
//! workspace size is a pure function of the call that never panics.
#![allow(non_upper_case_globals)]

use natsl::layer::{prefill_workspace_bytes_for, validate_prefill, validate_prefill_in, PrefillInputs, PrefillOptions, PrefillOutputs};
use natsl::ops::gdn::{PoolIndex, PoolOut};
use natsl::ops::router::RouterPolicy;
use natsl::{testing, Arch, DType, TensorMut, TensorRef};

type Edit = Box<dyn Fn(&mut P)>;

const bf: DType = DType::Bf16;
const f32_: DType = DType::F32;

// natsl-340M: D 1024, 6 GDN heads of 128 / 256, 12 softmax heads of 64 / 128.
const D: usize = 1024;
const H: usize = 6;
const DK: usize = 128;
const DV: usize = 256;
const HA: usize = 12;
const DVS: usize = 128;
/// A ragged batch: 70 + 130 tokens, neither a multiple of 64.
const CU: [i32; 3] = [0, 70, 200];
const T: usize = 200;
const N: usize = 2;
/// `T / 64 + N`.
const NS: usize = T / 64 + N;
/// Token stride of the packed q | k | v | z projection output.
const ROW: usize = H * DK + H * DK + H * DV + HA * DVS;

fn t(dtype: DType, shape: &[usize]) -> TensorRef<'static> {
    testing::fake_contiguous(dtype, shape)
}
fn tm(dtype: DType, shape: &[usize]) -> TensorMut<'static> {
    testing::fake_contiguous_mut(dtype, shape)
}
/// `v`'s memory seen through another shape / strides / element offset.
fn at(v: &TensorRef<'static>, offset: usize, dtype: DType, shape: &[usize], strides: &[usize]) -> TensorRef<'static> {
    // SAFETY: validated only, never launched on.
    unsafe { TensorRef::from_raw(v.ptr() + (offset * v.dtype().size()) as u64, v.avail() - offset, dtype, shape, strides) }
}

fn arg_of<T: std::fmt::Debug>(r: natsl::Result<T>) -> &'static str {
    match r {
        Err(e) => testing::invalid_arg(e),
        Ok(v) => panic!("expected InvalidArgument, got Ok({v:?})"),
    }
}

struct P {
    cu: Vec<i32>,
    /// The packed projection q | k | v | z, `[T, ROW]` bf16.
    proj: TensorRef<'static>,
    inp: PrefillInputs<'static>,
    out: PrefillOutputs<'static>,
    opts: PrefillOptions<'static>,
}

/// q, k, v and z as strided views of one projection output, as an engine passes them.
fn good() -> P {
    let proj = t(bf, &[T, ROW]);
    let inp = PrefillInputs {
        q: at(&proj, 0, bf, &[T, H, DK], &[ROW, DK, 1]),
        k: at(&proj, H * DK, bf, &[T, H, DK], &[ROW, DK, 1]),
        v: at(&proj, 2 * H * DK, bf, &[T, H, DV], &[ROW, DV, 1]),
        g: t(f32_, &[T, H]),
        beta: t(f32_, &[T, H]),
        x: t(bf, &[T, D]),
        w_score: t(bf, &[2 * H, D]),
        w: t(f32_, &[T, HA, 2]),
        gamma_gdn: t(bf, &[DVS]),
        gamma_att: t(bf, &[DVS]),
        z: at(&proj, 2 * H * DK + H * DV, bf, &[T, HA, DVS], &[ROW, DVS, 1]),
    };
    P { cu: CU.to_vec(), proj, inp, out: PrefillOutputs::new(tm(bf, &[T, HA, DVS])), opts: PrefillOptions::default() }
}

/// `good()` with every optional output: the router's, both state pools (6 rows, the
/// committed one through a host index), gsum_running.
fn good_full() -> P {
    let mut p = good();
    p.out.labels = Some(tm(DType::U8, &[NS, H]));
    p.out.attn_list = Some(tm(DType::I32, &[H, NS]));
    p.out.attn_count = Some(tm(DType::I32, &[N, H]));
    p.out.committed = Some(PoolOut { pool: tm(f32_, &[6, H, DK, DV]), index: Some(PoolIndex::Host(vec![4, 1])) });
    p.out.running = Some(PoolOut { pool: tm(f32_, &[N, H, DK, DV]), index: None });
    p.out.gsum_running = Some(tm(f32_, &[N, H]));
    p
}

fn run(p: &P) -> natsl::Result<natsl::layer::LayerPlan> {
    validate_prefill(&p.cu, &p.inp, &p.out, &p.opts)
}

fn writable(v: TensorRef<'static>) -> TensorMut<'static> {
    testing::as_writable(v)
}

#[test]
fn good_calls_pass() {
    let plan = run(&good()).unwrap();
    assert_eq!((plan.tokens, plan.seqs, plan.num_slots, plan.d_model), (T, N, NS, D));
    assert_eq!((plan.heads, plan.dk, plan.dv, plan.softmax_heads, plan.dks, plan.dvs), (H, DK, DV, HA, 64, DVS));
    assert_eq!(plan.caller_router, [false; 3]);
    let plan = run(&good_full()).unwrap();
    assert_eq!(plan.caller_router, [true; 3]);
    // Logits in the activation dtype, beta too, a top-k budget, a single sequence of one token.
    let mut p = good();
    p.inp.w = t(bf, &[T, HA, 2]);
    p.inp.beta = t(bf, &[T, H]);
    p.opts.router.policy = RouterPolicy::KeepFraction(0.3);
    run(&p).unwrap();
    let mut p = good();
    p.cu = vec![0, 1];
    let r = |dt, s: &[usize]| t(dt, s);
    p.inp = PrefillInputs { q: r(bf, &[1, H, DK]), k: r(bf, &[1, H, DK]), v: r(bf, &[1, H, DV]), g: r(f32_, &[1, H]), beta: r(f32_, &[1, H]), x: r(bf, &[1, D]), w_score: p.inp.w_score.clone(), w: r(f32_, &[1, HA, 2]), gamma_gdn: p.inp.gamma_gdn.clone(), gamma_att: p.inp.gamma_att.clone(), z: r(bf, &[1, HA, DVS]) };
    p.out = PrefillOutputs::new(tm(bf, &[1, HA, DVS]));
    run(&p).unwrap();
}

#[test]
fn other_model_shapes_pass() {
    // (D, H, dk, dv, Ha, dtype): natsl-760M (18 softmax heads of 64 / 128 over 6 of 192 / 384),
    // f16 with 4 softmax heads of 64 / 64 over 2 GDN heads of 128 / 128, and one softmax head
    // per GDN head (Ha = H: the softmax reads q, k, v as they are, any head stride).
    for (d, h, dk, dv, ha, dt) in [(1536, 6, 192, 384, 18, bf), (256, 2, 128, 128, 4, DType::F16), (512, 4, 64, 64, 4, bf)] {
        let (dks, dvs) = (h * dk / ha, h * dv / ha);
        let strided = ha == h;
        let hs = |w: usize| if strided { w + 64 } else { w };
        let r = |dt, s: &[usize]| t(dt, s);
        let qkv = |w: usize| {
            let base = t(dt, &[T, h * hs(w) + 64]);
            at(&base, 0, dt, &[T, h, w], &[h * hs(w) + 64, hs(w), 1])
        };
        let p = P {
            cu: CU.to_vec(),
            proj: r(dt, &[1]),
            inp: PrefillInputs { q: qkv(dk), k: qkv(dk), v: qkv(dv), g: r(f32_, &[T, h]), beta: r(dt, &[T, h]), x: r(dt, &[T, d]), w_score: r(dt, &[2 * h, d]), w: r(f32_, &[T, ha, 2]), gamma_gdn: r(dt, &[dvs]), gamma_att: r(dt, &[dvs]), z: r(dt, &[T, ha, dvs]) },
            out: PrefillOutputs::new(tm(dt, &[T, ha, dvs])),
            opts: PrefillOptions::default(),
        };
        let plan = run(&p).unwrap_or_else(|e| panic!("{d} {h} {dk} {dv} {ha}: {e}"));
        assert_eq!((plan.softmax_heads, plan.dks, plan.dvs), (ha, dks, dvs));
    }
}

#[test]
fn each_bad_argument_is_named() {
    let cases: Vec<(&str, Edit)> = vec![
        // The batch.
        ("cu_seqlens", Box::new(|p| p.cu = vec![0, 70, 70, 200])),
        ("cu_seqlens", Box::new(|p| p.cu = vec![1, 200])),
        // The router.
        ("x", Box::new(|p| p.inp.x = t(f32_, &[T, D]))),
        ("x", Box::new(|p| p.inp.x = t(bf, &[T + 1, D]))),
        ("x", Box::new(|p| p.inp.x = t(bf, &[T, 1004]))),
        ("w_score", Box::new(|p| p.inp.w_score = t(DType::F16, &[2 * H, D]))),
        ("w_score", Box::new(|p| p.inp.w_score = t(bf, &[2 * H, 512]))),
        ("w_score", Box::new(|p| p.inp.w_score = t(bf, &[2 * H - 1, D]))),
        // One routing head per GDN head.
        ("w_score", Box::new(|p| p.inp.w_score = t(bf, &[2 * (H - 1), D]))),
        ("policy", Box::new(|p| p.opts.router.policy = RouterPolicy::TopK(0))),
        ("policy", Box::new(|p| p.opts.router.policy = RouterPolicy::TopK(3))),
        ("policy", Box::new(|p| p.opts.router.policy = RouterPolicy::KeepFraction(0.0))),
        // The GDN branch.
        ("q", Box::new(|p| p.inp.q = t(f32_, &[T, H, DK]))),
        ("q", Box::new(|p| p.inp.q = t(bf, &[T - 1, H, DK]))),
        ("q", Box::new(|p| {
            p.inp.q = t(bf, &[T, H, 96]);
            p.inp.k = t(bf, &[T, H, 96]);
        })),
        ("k", Box::new(|p| p.inp.k = t(bf, &[T, H, 64]))),
        ("v", Box::new(|p| p.inp.v = t(bf, &[T, H, 200]))),
        // GVA (more value heads than q/k heads) is not the layer's shape.
        ("v", Box::new(|p| {
            p.inp.v = t(bf, &[T, 2 * H, DVS]);
            p.inp.g = t(f32_, &[T, 2 * H]);
            p.inp.beta = t(f32_, &[T, 2 * H]);
            (p.out.committed, p.out.running, p.out.gsum_running) = (None, None, None);
        })),
        ("g", Box::new(|p| p.inp.g = t(bf, &[T, H]))),
        ("g", Box::new(|p| p.inp.g = t(f32_, &[T, H + 1]))),
        ("beta", Box::new(|p| p.inp.beta = t(DType::F16, &[T, H]))),
        ("beta", Box::new(|p| p.inp.beta = t(f32_, &[T - 1, H]))),
        ("gdn.scale", Box::new(|p| p.opts.gdn.scale = Some(f32::NAN))),
        ("gdn.scale", Box::new(|p| p.opts.gdn.scale = Some(0.0))),
        // The softmax heads are 64-wide slices of each token's packed heads.
        ("q", Box::new(|p| p.inp.q = at(&p.proj, 0, bf, &[T, H, DK], &[ROW, DK + 8, 1]))),
        ("k", Box::new(|p| p.inp.k = at(&p.proj, H * DK, bf, &[T, H, DK], &[ROW, DK + 8, 1]))),
        ("v", Box::new(|p| p.inp.v = at(&p.proj, 2 * H * DK, bf, &[T, H, DV], &[ROW, DV + 8, 1]))),
        ("sparse.scale", Box::new(|p| p.opts.sparse.scale = Some(-1.0))),
        ("q_norm_w", Box::new(|p| p.opts.sparse.q_norm_w = Some(t(bf, &[DK])))),
        ("k_norm_w", Box::new(|p| p.opts.sparse.k_norm_w = Some(t(f32_, &[64])))),
        // z gives the softmax heads: they must tile the GDN heads.
        ("z", Box::new(|p| p.inp.z = t(bf, &[T, 8, 192]))),
        ("z", Box::new(|p| p.inp.z = t(bf, &[T, 4, 384]))),
        ("z", Box::new(|p| p.inp.z = t(bf, &[T, 9, DVS]))),
        ("z", Box::new(|p| p.inp.z = t(bf, &[T, 0, DVS]))),
        ("z", Box::new(|p| p.inp.z = t(bf, &[T - 1, HA, DVS]))),
        ("z", Box::new(|p| p.inp.z = testing::fake_view(bf, &[T, usize::MAX / 2, usize::MAX / 2], &[1 << 20, 1 << 10, 1], 1))),
        ("z", Box::new(|p| p.inp.z = testing::fake_view(bf, &[T, 48, usize::MAX / 2], &[1 << 20, 1 << 10, 1], 1))),
        ("z", Box::new(|p| p.inp.z = t(DType::F16, &[T, HA, DVS]))),
        // The merge.
        ("w", Box::new(|p| p.inp.w = t(f32_, &[T, HA, 3]))),
        ("w", Box::new(|p| p.inp.w = t(DType::F16, &[T, HA, 2]))),
        ("gamma_gdn", Box::new(|p| p.inp.gamma_gdn = t(bf, &[DV]))),
        ("gamma_att", Box::new(|p| p.inp.gamma_att = t(f32_, &[DVS]))),
        ("out", Box::new(|p| p.out.out = tm(bf, &[T, H, DV]))),
        ("out", Box::new(|p| p.out.out = tm(DType::F16, &[T, HA, DVS]))),
        // Router outputs.
        ("labels", Box::new(|p| p.out.labels = Some(tm(DType::U8, &[NS - 1, H])))),
        ("labels", Box::new(|p| p.out.labels = Some(tm(DType::I32, &[NS, H])))),
        ("attn_list", Box::new(|p| p.out.attn_list = Some(tm(DType::I32, &[NS, H])))),
        ("attn_count", Box::new(|p| p.out.attn_count = Some(tm(DType::U8, &[N, H])))),
        ("attn_count", Box::new(|p| p.out.attn_count = Some(tm(DType::I32, &[N + 1, H])))),
        // State outputs.
        ("committed", Box::new(|p| p.out.committed = Some(PoolOut { pool: tm(f32_, &[N, H, DK, DK]), index: None }))),
        ("committed", Box::new(|p| p.out.committed = Some(PoolOut { pool: tm(f32_, &[N, H, DK, DV]), index: Some(PoolIndex::Host(vec![0, 2])) }))),
        ("committed", Box::new(|p| p.out.committed = Some(PoolOut { pool: tm(f32_, &[4, H, DK, DV]), index: Some(PoolIndex::Host(vec![1, 1])) }))),
        ("running", Box::new(|p| p.out.running = Some(PoolOut { pool: tm(bf, &[N, H, DK, DV]), index: None }))),
        ("gsum_running", Box::new(|p| p.out.gsum_running = Some(tm(f32_, &[N, H + 1])))),
    ];
    for (i, (want, edit)) in cases.iter().enumerate() {
        let mut p = good_full();
        edit(&mut p);
        assert_eq!(arg_of(run(&p)), *want, "case {i}");
    }
}

#[test]
fn outputs_may_not_alias_anything() {
    let cases: Vec<(&str, Edit)> = vec![
        // The layer output over the projection's z (or q) columns.
        ("out", Box::new(|p| p.out.out = writable(p.inp.z.clone()))),
        ("out", Box::new(|p| p.out.out = writable(at(&p.proj, 0, bf, &[T, HA, DVS], &[ROW, DVS, 1])))),
        // Every output head at one address: two threads, one element.
        ("out", Box::new(|p| p.out.out = writable(at(&p.proj, 0, bf, &[T, HA, DVS], &[ROW, 0, 1])))),
        // Router outputs over an input or another output.
        ("labels", Box::new(|p| p.out.labels = Some(writable(at(&p.inp.x, 0, DType::U8, &[NS, H], &[H, 1]))))),
        ("attn_list", Box::new(|p| {
            let l = p.out.labels.as_ref().unwrap().view().clone();
            p.out.attn_list = Some(writable(at(&l, 0, DType::I32, &[H, NS], &[NS, 1])));
        })),
        ("attn_count", Box::new(|p| p.out.attn_count = Some(writable(at(&p.inp.g, 0, DType::I32, &[N, H], &[H, 1]))))),
        // A state pool over the projection, or the running pool over the committed one.
        ("committed", Box::new(|p| p.out.committed = Some(PoolOut { pool: writable(at(&p.proj, 0, f32_, &[N, H, DK, DV], &[H * DK * DV, DK * DV, DV, 1])), index: None }))),
        ("running", Box::new(|p| {
            let c = p.out.committed.as_ref().unwrap().pool.view().clone();
            p.out.running = Some(PoolOut { pool: writable(c), index: Some(PoolIndex::Host(vec![4, 1])) });
        })),
        ("gsum_running", Box::new(|p| p.out.gsum_running = Some(writable(at(&p.inp.beta, 0, f32_, &[N, H], &[H, 1]))))),
        // The sparse path's norm weights are inputs too.
        ("out", Box::new(|p| {
            let o = p.out.out.view().clone();
            p.opts.sparse.q_norm_w = Some(at(&o, 0, bf, &[64], &[1]));
        })),
    ];
    for (i, (want, edit)) in cases.iter().enumerate() {
        let mut p = good_full();
        edit(&mut p);
        assert_eq!(arg_of(run(&p)), *want, "case {i}");
    }
    // Inputs may overlap one another: q and k the same memory is legal.
    let mut p = good_full();
    p.inp.k = p.inp.q.clone();
    run(&p).unwrap();
}

#[test]
fn every_view_must_be_memory_of_the_runtime_context() {
    let ctx = testing::fake_context(1, 0);
    // All in context 1: validation against context 1 passes, against context 2 names the first view.
    let mut p = good_full();
    let f = |v: &TensorRef<'static>| testing::in_fake_context(v.clone(), 1, 0);
    p.inp = PrefillInputs { q: f(&p.inp.q), k: f(&p.inp.k), v: f(&p.inp.v), g: f(&p.inp.g), beta: f(&p.inp.beta), x: f(&p.inp.x), w_score: f(&p.inp.w_score), w: f(&p.inp.w), gamma_gdn: f(&p.inp.gamma_gdn), gamma_att: f(&p.inp.gamma_att), z: f(&p.inp.z) };
    p.out.out = writable(f(p.out.out.view()));
    p.out.labels = p.out.labels.as_ref().map(|l| writable(f(l.view())));
    validate_prefill_in(Some(ctx), &p.cu, &p.inp, &p.out, &p.opts).unwrap();
    assert_eq!(arg_of(validate_prefill_in(Some(testing::fake_context(2, 0)), &p.cu, &p.inp, &p.out, &p.opts)), "x");
    // One output of another context, without a runtime: named.
    p.out.labels = Some(writable(testing::in_fake_context(p.out.labels.as_ref().unwrap().view().clone(), 3, 0)));
    assert_eq!(arg_of(run(&p)), "labels");
}

#[test]
fn workspace_bytes_is_a_pure_function_of_the_call() {
    let size = |p: &P| prefill_workspace_bytes_for(Arch::Sm90a, 132, &p.cu, &p.inp, &p.out, &p.opts);
    let p = good();
    let a = size(&p).unwrap();
    assert_eq!(a, size(&p).unwrap());
    assert_eq!(a % 256, 0);
    // At least the two branch outputs and the router's lists.
    assert!(a >= T * H * DV * 2 + T * HA * DVS * 2 + NS * H * 5, "{a}");
    // The caller's router outputs live outside the workspace: it shrinks.
    let full = good_full();
    assert!(size(&full).unwrap() < a);
    // More tokens: more workspace; the sm_80 path sizes too.
    let mut big = good();
    big.cu = vec![0, 70, 200 + 4096];
    let tt = 200 + 4096;
    let proj = t(bf, &[tt, ROW]);
    big.inp.q = at(&proj, 0, bf, &[tt, H, DK], &[ROW, DK, 1]);
    big.inp.k = at(&proj, H * DK, bf, &[tt, H, DK], &[ROW, DK, 1]);
    big.inp.v = at(&proj, 2 * H * DK, bf, &[tt, H, DV], &[ROW, DV, 1]);
    big.inp.z = at(&proj, 2 * H * DK + H * DV, bf, &[tt, HA, DVS], &[ROW, DVS, 1]);
    for x in [&mut big.inp.g, &mut big.inp.beta] {
        *x = t(f32_, &[tt, H]);
    }
    big.inp.x = t(bf, &[tt, D]);
    big.inp.w = t(f32_, &[tt, HA, 2]);
    big.out.out = tm(bf, &[tt, HA, DVS]);
    let b = size(&big).unwrap();
    assert!(b > a);
    assert!(prefill_workspace_bytes_for(Arch::Sm80, 108, &big.cu, &big.inp, &big.out, &big.opts).unwrap() > 0);
    // A malformed call is an error naming the argument, not a size.
    let mut bad = good();
    bad.inp.z = t(bf, &[T, 7, DVS]);
    assert_eq!(arg_of(size(&bad)), "z");
}

#[test]
fn no_shape_panics() {
    // Degenerate and huge extents everywhere: validation and sizing answer, never panic.
    let dims = [0usize, 1, 2, 63, 64, 65, 128, 4096, usize::MAX / 3, usize::MAX];
    let mut k = 0u64;
    for &a in &dims {
        for &b in &dims {
            k += 1;
            let mut p = good_full();
            match k % 6 {
                0 => p.inp.q = t(bf, &[T, a.min(1 << 20), b.min(1 << 20)]),
                1 => p.inp.z = testing::fake_view(bf, &[T, a, b], &[a.saturating_mul(b), b, 1], 1),
                2 => p.inp.w_score = testing::fake_view(bf, &[a, b], &[b, 1], 1),
                3 => p.inp.v = testing::fake_view(bf, &[T, a, b], &[a.saturating_mul(b), b, 1], 1),
                4 => p.out.labels = Some(writable(testing::fake_view(DType::U8, &[a, b], &[b, 1], 1))),
                _ => p.inp.x = testing::fake_view(bf, &[a, b], &[b, 1], 1),
            }
            let _ = run(&p);
            let _ = prefill_workspace_bytes_for(Arch::Sm90a, 132, &p.cu, &p.inp, &p.out, &p.opts);
        }
    }
    // Empty and single-token batches.
    let mut p = good();
    p.cu = vec![0];
    let _ = run(&p);
    p.cu = vec![];
    let _ = run(&p);
}
