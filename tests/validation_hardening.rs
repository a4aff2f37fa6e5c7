//! Tier 1 (no GPU): the calls that used to get through or panic (issue 12). Outputs
//! that overlap themselves or alias other tensors, tensors of another CUDA context,
//! the scale and head-dim rules shared by both families, panic-free view and size
//! helpers, NUL bytes for NVRTC, a closed stdout pipe, and a few thousand malformed
//! calls that must each return an error without panicking.

use natsl::ops::gdn::{self, GdnDecodeInputs, GdnDecodeState, GdnOptions, GdnPrefillInputs, GdnPrefillOutputs, PoolIn, PoolOut};
use natsl::ops::router::{self, RouterOptions, RouterPolicy};
use natsl::ops::sparse::{self, BlockMask, PagedKv, SparseOptions};
use natsl::tensor::ContextId;
use natsl::{testing, DType, SeqLayout, TensorMut, TensorRef};
use rand::Rng;
use std::panic::{catch_unwind, AssertUnwindSafe};

type V = TensorRef<'static>;
type M = TensorMut<'static>;

fn t(dtype: DType, shape: &[usize]) -> V {
    testing::fake_contiguous(dtype, shape)
}
fn tm(dtype: DType, shape: &[usize]) -> M {
    testing::fake_contiguous_mut(dtype, shape)
}
/// A view at `ptr` (just large enough for its strides).
fn at(ptr: u64, dtype: DType, shape: &[usize], strides: &[usize]) -> V {
    let avail = shape.iter().zip(strides).map(|(s, st)| (s - 1) * st).sum::<usize>() + 1;
    // SAFETY: validation never dereferences it.
    unsafe { TensorRef::from_raw(ptr, avail, dtype, shape, strides) }
}
/// A strided view of its own.
fn ts(dtype: DType, shape: &[usize], strides: &[usize]) -> V {
    at(testing::fake_address(), dtype, shape, strides)
}
fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}
/// A contiguous view of `shape` at `ptr` (to alias another view).
fn over(ptr: u64, dtype: DType, shape: &[usize]) -> V {
    at(ptr, dtype, shape, &contiguous(shape))
}
fn w(v: V) -> M {
    testing::as_writable(v)
}
#[track_caller]
fn arg_of<T: std::fmt::Debug>(r: natsl::Result<T>) -> &'static str {
    match r {
        Err(e) => testing::invalid_arg(e),
        Ok(v) => panic!("expected InvalidArgument, got Ok({v:?})"),
    }
}
fn ctx(n: usize) -> ContextId {
    testing::fake_context(0x1000 * n, n)
}

// ---- the good calls -------------------------------------------------------

// GDN prefill: 2 sequences (72 + 128 tokens), Hqk 2, Hv 4, dk = dv = 128.
const GCU: [i32; 3] = [0, 72, 200];
const GT: usize = 200;
const GSLOTS: usize = GT / 64 + 2;

struct GdnPre {
    cu: Vec<i32>,
    i: GdnPrefillInputs<'static>,
    o: GdnPrefillOutputs<'static>,
    opts: GdnOptions,
}
fn gdn_pre() -> GdnPre {
    GdnPre {
        cu: GCU.to_vec(),
        i: GdnPrefillInputs {
            q: t(DType::Bf16, &[GT, 2, 128]),
            k: t(DType::Bf16, &[GT, 2, 128]),
            v: t(DType::Bf16, &[GT, 4, 128]),
            g: t(DType::F32, &[GT, 4]),
            beta: t(DType::F32, &[GT, 4]),
            labels: Some(t(DType::U8, &[GSLOTS, 2])),
            h0: Some(PoolIn { pool: t(DType::F32, &[5, 4, 128, 128]), index: Some(vec![4, 0].into()) }),
        },
        o: GdnPrefillOutputs {
            o: tm(DType::Bf16, &[GT, 4, 128]),
            committed: Some(PoolOut { pool: tm(DType::F32, &[3, 4, 128, 128]), index: Some(vec![2, 1].into()) }),
            running: Some(PoolOut { pool: tm(DType::F32, &[2, 4, 128, 128]), index: None }),
            gsum_running: Some(tm(DType::F32, &[2, 4])),
        },
        opts: GdnOptions::default(),
    }
}
fn run_gdn_pre(c: &GdnPre) -> natsl::Result<gdn::GdnDims> {
    gdn::validate_prefill(&c.cu, &c.i, &c.o, &c.opts)
}

// GDN decode: 3 sequences x 2 tokens, Hqk 2, Hv 4, dk = dv = 128.
struct GdnDec {
    i: GdnDecodeInputs<'static>,
    o: M,
    st: GdnDecodeState<'static>,
    opts: GdnOptions,
}
fn gdn_dec() -> GdnDec {
    GdnDec {
        i: GdnDecodeInputs {
            q: t(DType::Bf16, &[6, 2, 128]),
            k: t(DType::Bf16, &[6, 2, 128]),
            v: t(DType::Bf16, &[6, 4, 128]),
            g: t(DType::F32, &[6, 4]),
            beta: t(DType::Bf16, &[6, 4]),
            labels: Some(t(DType::U8, &[3, 4])),
            tokens_per_seq: 2,
        },
        o: tm(DType::Bf16, &[6, 4, 128]),
        st: GdnDecodeState {
            running: tm(DType::F32, &[8, 4, 128, 128]),
            running_index: t(DType::I32, &[3]),
            committed: Some((tm(DType::F32, &[8, 4, 128, 128]), t(DType::I32, &[3]))),
            gsum: Some(tm(DType::F32, &[3, 4])),
            pos: Some(tm(DType::I32, &[3])),
        },
        opts: GdnOptions::default(),
    }
}
fn run_gdn_dec(c: &GdnDec) -> natsl::Result<gdn::GdnDims> {
    gdn::validate_decode(&c.i, c.o.view(), &c.st, &c.opts)
}

// Sparse prefill: NAtS-L 64/128 shapes, 2 sequences (100 + 64 tokens), 12 heads, 6 routing heads.
const SCU: [i32; 3] = [0, 100, 164];
const ST: usize = 164;
const SSLOTS: usize = ST / 64 + 2;

struct SpPre {
    cu: Vec<i32>,
    q: V,
    k: V,
    v: V,
    mask: BlockMask<'static>,
    opts: SparseOptions<'static>,
    o: V,
    lse: Option<V>,
}
fn sp_pre() -> SpPre {
    SpPre {
        cu: SCU.to_vec(),
        q: ts(DType::Bf16, &[ST, 12, 64], &[768, 64, 1]),
        k: ts(DType::Bf16, &[ST, 12, 64], &[768, 64, 1]),
        v: ts(DType::Bf16, &[ST, 12, 128], &[1536, 128, 1]),
        mask: BlockMask::Routed { attn_list: t(DType::I32, &[6, SSLOTS]), attn_count: t(DType::I32, &[2, 6]) },
        opts: SparseOptions { q_norm_w: Some(t(DType::Bf16, &[64])), k_norm_w: Some(t(DType::Bf16, &[64])), ..Default::default() },
        o: t(DType::Bf16, &[ST, 12, 128]),
        lse: Some(t(DType::F32, &[ST, 12])),
    }
}
fn run_sp_pre(c: &SpPre) -> natsl::Result<sparse::PrefillPlan> {
    sparse::validate_prefill(&c.cu, &c.q, &c.k, &c.v, &c.mask, &c.opts, &c.o, c.lse.as_ref())
}

// Sparse decode: 3 sequences x 2 queries, 12 heads, 6 table heads, 40 pages.
struct SpDec {
    q: V,
    nq: usize,
    kv: PagedKv<'static>,
    opts: SparseOptions<'static>,
    o: V,
    lse: Option<V>,
}
fn sp_dec() -> SpDec {
    SpDec {
        q: t(DType::F16, &[6, 12, 64]),
        nq: 2,
        kv: PagedKv {
            k_pages: t(DType::F16, &[40, 64, 12, 64]),
            v_pages: t(DType::F16, &[40, 64, 12, 128]),
            page_table: t(DType::I32, &[3, 6, 16]),
            page_count: t(DType::I32, &[3, 6]),
            cur_page: t(DType::I32, &[3]),
            cur_len: t(DType::I32, &[3]),
        },
        opts: SparseOptions::default(),
        o: t(DType::F16, &[6, 12, 128]),
        lse: Some(t(DType::F32, &[6, 12])),
    }
}
fn run_sp_dec(c: &SpDec) -> natsl::Result<sparse::DecodePlan> {
    sparse::validate_decode(&c.q, c.nq, &c.kv, &c.opts, &c.o, c.lse.as_ref())
}

struct Route {
    layout: SeqLayout,
    x: V,
    w: V,
    opts: RouterOptions,
}
fn route() -> Route {
    Route { layout: SeqLayout::new(&[0, 256, 512]).unwrap(), x: t(DType::Bf16, &[512, 1024]), w: t(DType::Bf16, &[12, 1024]), opts: RouterOptions::default() }
}
fn run_route(c: &Route) -> natsl::Result<router::RouterPlan> {
    router::validate(&c.layout, &c.x, &c.w, &c.opts)
}

#[test]
fn the_good_calls_pass() {
    run_gdn_pre(&gdn_pre()).unwrap();
    run_gdn_dec(&gdn_dec()).unwrap();
    run_sp_pre(&sp_pre()).unwrap();
    run_sp_dec(&sp_dec()).unwrap();
    run_route(&route()).unwrap();
}

// ---- 1. outputs that overlap themselves ------------------------------------

#[test]
fn outputs_that_overlap_themselves_are_rejected() {
    // GDN prefill o [T, 4, 128]: a zero head stride, heads that interleave, a zero token stride.
    for st in [[512, 0, 1], [512, 64, 1], [0, 128, 1], [256, 128, 1]] {
        let mut c = gdn_pre();
        c.o.o = w(ts(DType::Bf16, &[GT, 4, 128], &st));
        assert_eq!(arg_of(run_gdn_pre(&c)), "o", "strides {st:?}");
    }
    // GDN decode o, and pos [N] with a zero stride (every sequence would write one pos).
    let mut c = gdn_dec();
    c.o = w(ts(DType::Bf16, &[6, 4, 128], &[512, 0, 1]));
    assert_eq!(arg_of(run_gdn_dec(&c)), "o");
    let mut c = gdn_dec();
    c.st.pos = Some(w(ts(DType::I32, &[3], &[0])));
    assert_eq!(arg_of(run_gdn_dec(&c)), "pos");
    // Sparse prefill and decode: o and lse.
    let mut c = sp_pre();
    c.o = ts(DType::Bf16, &[ST, 12, 128], &[1536, 0, 1]);
    assert_eq!(arg_of(run_sp_pre(&c)), "o");
    let mut c = sp_pre();
    c.lse = Some(ts(DType::F32, &[ST, 12], &[0, 1]));
    assert_eq!(arg_of(run_sp_pre(&c)), "lse");
    let mut c = sp_dec();
    c.o = ts(DType::F16, &[6, 12, 128], &[64, 128, 1]);
    assert_eq!(arg_of(run_sp_dec(&c)), "o");
    let mut c = sp_dec();
    c.lse = Some(ts(DType::F32, &[6, 12], &[4, 1]));
    assert_eq!(arg_of(run_sp_dec(&c)), "lse");
    // Inputs may broadcast (a zero stride is only a problem for writes).
    let mut c = sp_pre();
    c.q = ts(DType::Bf16, &[ST, 12, 64], &[768, 0, 1]);
    run_sp_pre(&c).unwrap();
}

// ---- 2. outputs that alias inputs, and state pools that alias each other --

#[test]
fn outputs_that_alias_inputs_are_rejected() {
    // GDN prefill: o over q, gsum over g, the committed pool over v, o over labels.
    let mut c = gdn_pre();
    c.o.o = w(over(c.i.q.ptr(), DType::Bf16, &[GT, 4, 128]));
    assert_eq!(arg_of(run_gdn_pre(&c)), "o");
    let mut c = gdn_pre();
    c.o.gsum_running = Some(w(over(c.i.g.ptr() + 64, DType::F32, &[2, 4])));
    assert_eq!(arg_of(run_gdn_pre(&c)), "gsum_running");
    let mut c = gdn_pre();
    c.o.committed = Some(PoolOut { pool: w(over(c.i.v.ptr(), DType::F32, &[3, 4, 128, 128])), index: Some(vec![0, 2].into()) });
    assert_eq!(arg_of(run_gdn_pre(&c)), "committed");
    let mut c = gdn_pre();
    let l = c.i.labels.as_ref().unwrap().ptr();
    c.o.o = w(over(l - 1024, DType::Bf16, &[GT, 4, 128]));
    assert_eq!(arg_of(run_gdn_pre(&c)), "o");
    // GDN decode: o over q, the running pool over k, gsum over the running index.
    let mut c = gdn_dec();
    c.o = w(over(c.i.q.ptr(), DType::Bf16, &[6, 4, 128]));
    assert_eq!(arg_of(run_gdn_dec(&c)), "o");
    let mut c = gdn_dec();
    c.st.running = w(over(c.i.k.ptr(), DType::F32, &[8, 4, 128, 128]));
    assert_eq!(arg_of(run_gdn_dec(&c)), "running");
    let mut c = gdn_dec();
    c.st.gsum = Some(w(over(c.st.running_index.ptr(), DType::F32, &[3, 4])));
    assert_eq!(arg_of(run_gdn_dec(&c)), "gsum");
    // Sparse prefill: o over v, lse over q, o over the router's list.
    let mut c = sp_pre();
    c.o = over(c.v.ptr() + 4096, DType::Bf16, &[ST, 12, 128]);
    assert_eq!(arg_of(run_sp_pre(&c)), "o");
    let mut c = sp_pre();
    c.lse = Some(over(c.q.ptr(), DType::F32, &[ST, 12]));
    assert_eq!(arg_of(run_sp_pre(&c)), "lse");
    let mut c = sp_pre();
    let BlockMask::Routed { attn_list, .. } = &c.mask else { unreachable!() };
    c.o = over(attn_list.ptr(), DType::Bf16, &[ST, 12, 128]);
    assert_eq!(arg_of(run_sp_pre(&c)), "o");
    // Outputs over each other: lse inside o.
    let mut c = sp_pre();
    c.lse = Some(over(c.o.ptr() + 1024, DType::F32, &[ST, 12]));
    assert_eq!(arg_of(run_sp_pre(&c)), "lse");
    // Sparse decode: o over q, lse over the k pages, o over the page table.
    let mut c = sp_dec();
    c.o = over(c.q.ptr(), DType::F16, &[6, 12, 128]);
    assert_eq!(arg_of(run_sp_dec(&c)), "o");
    let mut c = sp_dec();
    c.lse = Some(over(c.kv.k_pages.ptr() + 65536, DType::F32, &[6, 12]));
    assert_eq!(arg_of(run_sp_dec(&c)), "lse");
    let mut c = sp_dec();
    c.o = over(c.kv.page_table.ptr(), DType::F16, &[6, 12, 128]);
    assert_eq!(arg_of(run_sp_dec(&c)), "o");
}

#[test]
fn state_pools_that_alias_each_other_are_rejected() {
    // Prefill: committed and running on the same memory (sequence 1 writes row 1 of both).
    let mut c = gdn_pre();
    let p = c.o.committed.as_ref().unwrap().pool.ptr();
    c.o.running.as_mut().unwrap().pool = w(over(p, DType::F32, &[2, 4, 128, 128]));
    assert_eq!(arg_of(run_gdn_pre(&c)), "running");
    // Prefill: h0 and committed share rows through permuted indices: sequence 0 reads
    // row 4 of the pool while sequence 1 writes it.
    let mut c = gdn_pre();
    let h0 = c.i.h0.as_ref().unwrap().pool.ptr();
    c.o.committed = Some(PoolOut { pool: w(over(h0, DType::F32, &[5, 4, 128, 128])), index: Some(vec![0, 4].into()) });
    assert_eq!(arg_of(run_gdn_pre(&c)), "committed");
    // ... also when the pools are offset views of one allocation (row 4 of h0 is row 3 here).
    let row = 4 * 128 * 128 * 4;
    let committed_at = |c: &mut GdnPre, off: u64, rows: usize, index: Vec<i32>| {
        let h0 = c.i.h0.as_ref().unwrap().pool.ptr();
        c.o.committed = Some(PoolOut { pool: w(over(h0 + off, DType::F32, &[rows, 4, 128, 128])), index: Some(index.into()) });
    };
    let mut c = gdn_pre();
    committed_at(&mut c, row, 4, vec![1, 3]);
    assert_eq!(arg_of(run_gdn_pre(&c)), "committed");
    // The in-place update prefill allows: each sequence reads and writes its own row.
    let mut c = gdn_pre();
    committed_at(&mut c, 0, 5, vec![4, 0]);
    run_gdn_pre(&c).unwrap();
    let mut c = gdn_pre();
    committed_at(&mut c, row, 4, vec![3, 1]);
    c.i.h0.as_mut().unwrap().index = Some(vec![4, 2].into());
    run_gdn_pre(&c).unwrap();
    // ... but not a row that half overlaps another.
    let mut c = gdn_pre();
    committed_at(&mut c, row / 2, 4, vec![3, 1]);
    assert_eq!(arg_of(run_gdn_pre(&c)), "committed");
    // Decode: running and committed on one allocation (device indices cannot be checked).
    let mut c = gdn_dec();
    let p = c.st.running.ptr();
    c.st.committed.as_mut().unwrap().0 = w(over(p, DType::F32, &[8, 4, 128, 128]));
    assert_eq!(arg_of(run_gdn_dec(&c)), "committed");
    let mut c = gdn_dec();
    let p = c.st.running.ptr();
    c.st.committed.as_mut().unwrap().0 = w(over(p + 4 * row, DType::F32, &[8, 4, 128, 128]));
    assert_eq!(arg_of(run_gdn_dec(&c)), "committed");
}

#[test]
fn disjoint_slices_of_one_buffer_are_not_aliases() {
    // q | k | v | o as column slices of one packed [T, 4608] bf16 buffer.
    let base = testing::fake_address();
    let pitch = 768 + 768 + 1536 + 1536;
    let slice = |col: usize, h: usize, d: usize| at(base + 2 * col as u64, DType::Bf16, &[ST, h, d], &[pitch, d, 1]);
    let mut c = sp_pre();
    c.q = slice(0, 12, 64);
    c.k = slice(768, 12, 64);
    c.v = slice(1536, 12, 128);
    c.o = slice(3072, 12, 128);
    run_sp_pre(&c).unwrap();
    // o shifted onto v's columns.
    c.o = slice(2048, 12, 128);
    assert_eq!(arg_of(run_sp_pre(&c)), "o");
}

// ---- 3. tensors of another device or context --------------------------------

#[test]
fn tensors_of_another_context_are_rejected_before_launch() {
    let other = |v: V, n: usize| testing::in_fake_context(v, 0x1000 * n, n);
    // Without a runtime: the tensors of one call must share one context.
    let mut c = gdn_pre();
    c.i.q = other(c.i.q, 1);
    c.i.k = other(c.i.k, 2);
    assert_eq!(arg_of(run_gdn_pre(&c)), "k");
    // With the runtime's context (what every entry point passes).
    let mut c = gdn_pre();
    c.o.o = testing::as_writable(other(c.o.o.view().clone(), 2));
    assert_eq!(arg_of(gdn::validate_prefill_in(Some(ctx(1)), &c.cu, &c.i, &c.o, &c.opts)), "o");
    let mut c = gdn_pre();
    c.i.h0.as_mut().unwrap().pool = other(c.i.h0.as_ref().unwrap().pool.clone(), 3);
    assert_eq!(arg_of(gdn::validate_prefill_in(Some(ctx(1)), &c.cu, &c.i, &c.o, &c.opts)), "h0");
    // Views of the runtime's own context, and raw views, pass.
    let mut c = gdn_pre();
    c.i.q = other(c.i.q, 1);
    gdn::validate_prefill_in(Some(ctx(1)), &c.cu, &c.i, &c.o, &c.opts).unwrap();

    let mut c = gdn_dec();
    c.st.running_index = other(c.st.running_index, 2);
    assert_eq!(arg_of(gdn::validate_decode_in(Some(ctx(1)), &c.i, c.o.view(), &c.st, &c.opts)), "running_index");
    let mut c = gdn_dec();
    c.st.pos = Some(testing::as_writable(other(c.st.pos.as_ref().unwrap().view().clone(), 4)));
    assert_eq!(arg_of(gdn::validate_decode_in(Some(ctx(1)), &c.i, c.o.view(), &c.st, &c.opts)), "pos");

    let mut c = sp_pre();
    c.v = other(c.v, 2);
    assert_eq!(arg_of(sparse::validate_prefill_in(Some(ctx(1)), &c.cu, &c.q, &c.k, &c.v, &c.mask, &c.opts, &c.o, c.lse.as_ref())), "v");
    let mut c = sp_pre();
    c.opts.k_norm_w = Some(other(c.opts.k_norm_w.take().unwrap(), 2));
    c.q = other(c.q, 1);
    assert_eq!(arg_of(run_sp_pre(&c)), "k_norm_w");

    let mut c = sp_dec();
    c.kv.page_table = other(c.kv.page_table, 7);
    assert_eq!(arg_of(sparse::validate_decode_in(Some(ctx(1)), &c.q, c.nq, &c.kv, &c.opts, &c.o, c.lse.as_ref())), "page_table");

    let c = route();
    let x = other(c.x.clone(), 2);
    assert_eq!(arg_of(router::validate_in(Some(ctx(1)), &c.layout, &x, &c.w, &c.opts)), "x");
    // The same context on another device is another context.
    let x = testing::in_fake_context(c.x.clone(), 0x1000, 2);
    assert_eq!(arg_of(router::validate_in(Some(ctx(1)), &c.layout, &x, &c.w, &c.opts)), "x");
}

// ---- 4. one scale rule ------------------------------------------------------

#[test]
fn one_scale_rule_for_both_families() {
    let bad = [0.0f32, -0.0, -0.125, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MAX / 1.2];
    let good = [1e-30f32, 0.088, 1.0, 100.0, f32::MAX / 2.0];
    for (s, ok) in bad.iter().map(|&s| (s, false)).chain(good.iter().map(|&s| (s, true))) {
        let mut a = gdn_pre();
        a.opts.scale = Some(s);
        let mut b = gdn_dec();
        b.opts.scale = Some(s);
        let mut c = sp_pre();
        c.opts.scale = Some(s);
        let mut d = sp_dec();
        d.opts.scale = Some(s);
        let results = [run_gdn_pre(&a).map(|_| ()), run_gdn_dec(&b).map(|_| ()), run_sp_pre(&c).map(|_| ()), run_sp_dec(&d).map(|_| ())];
        for r in results {
            if ok {
                r.unwrap_or_else(|e| panic!("scale {s}: {e}"));
            } else {
                assert_eq!(arg_of(r), "scale", "scale {s}");
            }
        }
    }
}

// ---- 5. one head-dim error --------------------------------------------------

#[test]
fn unsupported_head_dims_are_one_invalid_argument_naming_the_tensor() {
    // GDN: dk 96 (no pair) names q; dk 128 / dv 64 (no such pair) names v.
    let mut c = gdn_pre();
    c.i.q = t(DType::Bf16, &[GT, 2, 96]);
    c.i.k = t(DType::Bf16, &[GT, 2, 96]);
    assert_eq!(arg_of(run_gdn_pre(&c)), "q");
    let mut c = gdn_pre();
    c.i.v = t(DType::Bf16, &[GT, 4, 64]);
    c.o.o = tm(DType::Bf16, &[GT, 4, 64]);
    assert_eq!(arg_of(run_gdn_pre(&c)), "v");
    let mut c = gdn_dec();
    c.i.q = t(DType::Bf16, &[6, 2, 96]);
    c.i.k = t(DType::Bf16, &[6, 2, 96]);
    assert_eq!(arg_of(run_gdn_dec(&c)), "q");
    // Sparse: the same rule.
    let mut c = sp_pre();
    c.q = t(DType::Bf16, &[ST, 12, 32]);
    c.k = t(DType::Bf16, &[ST, 12, 32]);
    assert_eq!(arg_of(run_sp_pre(&c)), "q");
    let mut c = sp_pre();
    c.v = t(DType::Bf16, &[ST, 12, 96]);
    c.o = t(DType::Bf16, &[ST, 12, 96]);
    assert_eq!(arg_of(run_sp_pre(&c)), "v");
    let mut c = sp_dec();
    c.q = t(DType::F16, &[6, 12, 32]);
    c.kv.k_pages = t(DType::F16, &[40, 64, 12, 32]);
    assert_eq!(arg_of(run_sp_dec(&c)), "q");
}

// ---- 6. panics removed --------------------------------------------------------

#[test]
fn view_helpers_do_not_panic() {
    // More strides than dims, fewer strides than dims.
    let v = testing::fake_view(DType::Bf16, &[4, 8], &[8, 8, 8, 1], 1 << 10);
    assert_eq!(arg_of(v.check_layout("v", 16)), "v");
    let v = testing::fake_view(DType::Bf16, &[4, 8, 2], &[8, 1], 1 << 10);
    assert_eq!(arg_of(v.check_layout("v", 16)), "v");
    assert_eq!(v.stride(5), 0);
    assert_eq!(v.dim(5), 0);
    // numel of a huge shape saturates instead of overflowing.
    let v = testing::fake_view(DType::U8, &[usize::MAX, 3], &[0, 0], 1);
    assert_eq!(v.numel(), usize::MAX);
    assert_eq!(v.checked_numel(), None);
    // stride x element size overflows (used to wrap to 0 and pass the alignment check).
    let v = testing::fake_view(DType::Bf16, &[2, 8], &[(usize::MAX >> 1) + 1, 1], usize::MAX);
    assert_eq!(arg_of(v.check_layout("v", 16)), "v");
    // Offsets past the end of the address space.
    // SAFETY: never dereferenced.
    let v = unsafe { TensorRef::from_raw(u64::MAX - 15, 1 << 20, DType::F32, &[64, 64], &[64, 1]) };
    assert_eq!(arg_of(v.check_layout("v", 16)), "v");
    // SeqLayout::seq_len out of range.
    let l = SeqLayout::new(&[0, 10, 30]).unwrap();
    assert_eq!((l.seq_len(0), l.seq_len(1), l.seq_len(2), l.seq_len(usize::MAX)), (10, 20, 0, 0));
}

#[test]
fn size_helpers_saturate_instead_of_overflowing() {
    assert_eq!(gdn::workspace_bytes(usize::MAX, 64, 256, 256), usize::MAX);
    assert_eq!(gdn::workspace_bytes(1 << 40, 1 << 20, 256, 256), usize::MAX);
    assert_eq!(gdn::cp_workspace_bytes(usize::MAX, 64, 64, 256, 256), usize::MAX);
    assert_eq!(gdn::scan_smem_bytes(usize::MAX, 64, 1), usize::MAX);
    assert_eq!(gdn::reg_scan_smem_bytes(usize::MAX, 32, usize::MAX), usize::MAX);
    assert_eq!(gdn::prep_smem_bytes(usize::MAX, 1), usize::MAX);
    assert_eq!(sparse::prefill_ws_grid(usize::MAX, usize::MAX, usize::MAX), u64::MAX);
    // The context-parallel segment model on absurd inputs: an answer, no panic.
    let s = gdn::cp_auto_segments(&[usize::MAX, 3, 1 << 40], usize::MAX, usize::MAX, usize::MAX, 1, usize::MAX, usize::MAX);
    assert!(s >= 1);
    let s = gdn::cp_auto_segments(&[1 << 50; 4], 1 << 30, 128, 128, 64, 0, 132);
    assert!((1..=64).contains(&s));
    assert_eq!(gdn::cp_geometry(usize::MAX, usize::MAX), (1, usize::MAX));
    // Split-KV of a hand-made plan with huge fields.
    let mut plan = run_sp_dec(&sp_dec()).unwrap();
    plan.max_pages = usize::MAX;
    plan.num_seqs = usize::MAX;
    let (splits, pps) = plan.splits(132, None);
    assert!(splits >= 1 && pps >= 1);
    let _ = plan.splits(u32::MAX, Some(usize::MAX));
}

#[test]
fn nul_bytes_for_nvrtc_are_invalid_arguments() {
    // Checked before NVRTC is even loaded, so this runs everywhere.
    let opts = natsl::jit::options(natsl::Arch::Sm80);
    assert_eq!(arg_of(natsl::jit::compile_uncached("a\0b", "int x;", &opts)), "name");
    assert_eq!(arg_of(natsl::jit::compile_uncached("a", "int\0 x;", &opts)), "source");
    let mut bad = opts.clone();
    bad.push("-DX=\0".into());
    assert_eq!(arg_of(natsl::jit::compile_uncached("a", "int x;", &bad)), "opts");
}

#[test]
fn the_cli_ends_quietly_on_a_closed_pipe() {
    use std::os::unix::process::ExitStatusExt;
    // The binary cargo built, or (test binaries carried to a GPU host by
    // ../shared/gpu/pack) the one beside them; resolved at run time.
    let built = std::path::PathBuf::from(env!("CARGO_BIN_EXE_natsl"));
    let carried = std::env::var_os("CARGO_MANIFEST_DIR").map(|d| std::path::PathBuf::from(d).join(".gpu/bin/natsl"));
    let Some(exe) = [Some(built), carried].into_iter().flatten().find(|p| p.exists()) else {
        println!("skipped: no natsl binary");
        return;
    };
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader); // `natsl kernels | head` once head has exited
    let out = std::process::Command::new(exe).arg("kernels").stdout(writer).stderr(std::process::Stdio::piped()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.is_empty(), "not quiet: {err}");
    // Ended by SIGPIPE, as a C tool would be (or exit 0).
    assert!(out.status.success() || out.status.signal() == Some(libc::SIGPIPE), "{:?}", out.status);
}

// ---- hundreds of malformed calls: an error each, never a panic ---------------

/// A random view that no slot of the good calls accepts (dims no good call uses,
/// random strides and stride counts, bad bases and lengths, any dtype).
fn garbage(rng: &mut rand::rngs::StdRng) -> V {
    const DIMS: [usize; 12] = [0, 1, 7, 9, 33, 65, 127, 129, 1 << 31, (1 << 32) + 1, usize::MAX / 3, usize::MAX];
    const STRIDES: [usize; 10] = [0, 1, 2, 7, 64, 1 << 20, 1 << 40, (usize::MAX >> 1) + 1, usize::MAX / 3, usize::MAX];
    let dtypes = [DType::Bf16, DType::F16, DType::F32, DType::I32, DType::U8];
    let rank = rng.gen_range(0..6);
    let mut shape: Vec<usize> = (0..rank).map(|_| DIMS[rng.gen_range(0..DIMS.len())]).collect();
    if rank > 0 && shape.iter().all(|&d| d == 1) {
        shape[0] = 7; // all-ones could match a [1]-shaped slot by luck
    }
    let ns = (rank as i64 + rng.gen_range(-1..=1)).max(0) as usize;
    let strides: Vec<usize> = (0..ns).map(|_| STRIDES[rng.gen_range(0..STRIDES.len())]).collect();
    let base = testing::fake_address();
    let ptr = [base, base + 1, base + 2, base + 8, 0, u64::MAX - 15, u64::MAX][rng.gen_range(0..7)];
    let avail = [0, 1, 4096, 1 << 40, usize::MAX][rng.gen_range(0..5)];
    // SAFETY: never dereferenced.
    unsafe { TensorRef::from_raw(ptr, avail, dtypes[rng.gen_range(0..5)], &shape, &strides) }
}

fn bad_scale(rng: &mut rand::rngs::StdRng) -> Option<f32> {
    Some([0.0, -1.0, f32::NAN, f32::INFINITY, f32::MAX][rng.gen_range(0..5)])
}

/// Apply 1..=3 breakers (each leaves the call invalid whatever the others do) and
/// check that validation returns an error without panicking.
fn fuzz<C, R: std::fmt::Debug>(name: &str, seed: u64, calls: usize, good: fn() -> C, breakers: &[fn(&mut C, &mut rand::rngs::StdRng)], run: fn(&C) -> natsl::Result<R>) -> usize {
    let mut rng = testing::rng(seed);
    let mut n = 0;
    let mut check = |c: &C, what: &str| {
        match catch_unwind(AssertUnwindSafe(|| run(c))) {
            Ok(Err(_)) => {}
            Ok(Ok(v)) => panic!("{name}: malformed call {what} accepted: {v:?}"),
            Err(_) => panic!("{name}: malformed call {what} panicked"),
        }
        n += 1;
    };
    for (i, b) in breakers.iter().enumerate() {
        let mut c = good();
        b(&mut c, &mut rng);
        check(&c, &format!("breaker {i}"));
    }
    for k in 0..calls {
        let mut c = good();
        let picks: Vec<usize> = (0..rng.gen_range(1..=3)).map(|_| rng.gen_range(0..breakers.len())).collect();
        for &p in &picks {
            breakers[p](&mut c, &mut rng);
        }
        check(&c, &format!("#{k} (breakers {picks:?})"));
    }
    n
}

#[test]
fn hundreds_of_malformed_calls_return_errors_without_panicking() {
    let mut total = 0;
    let gdn_pre_breakers: &[fn(&mut GdnPre, &mut rand::rngs::StdRng)] = &[
        |c, r| c.i.q = garbage(r),
        |c, r| c.i.k = garbage(r),
        |c, r| c.i.v = garbage(r),
        |c, r| c.i.g = garbage(r),
        |c, r| c.i.beta = garbage(r),
        |c, r| c.i.labels = Some(garbage(r)),
        |c, r| c.i.h0.as_mut().unwrap().pool = garbage(r),
        |c, r| c.o.o = w(garbage(r)),
        |c, r| c.o.committed.as_mut().unwrap().pool = w(garbage(r)),
        |c, r| c.o.running = Some(PoolOut { pool: w(garbage(r)), index: None }),
        |c, r| c.o.gsum_running = Some(w(garbage(r))),
        |c, r| c.opts.scale = bad_scale(r),
        |c, r| c.i.h0.as_mut().unwrap().index = Some(vec![r.gen_range(5..i32::MAX), 0].into()),
        |c, _| c.i.h0.as_mut().unwrap().index = Some(vec![i32::MIN, 0].into()),
        |c, r| c.o.committed.as_mut().unwrap().index = Some(vec![r.gen_range(0..3); 2].into()),
        |c, _| c.o.committed.as_mut().unwrap().index = Some(vec![0; 3].into()),
        |c, r| c.cu = vec![0, 72, [-1, 0, 71, i32::MAX][r.gen_range(0..4)]],
        |c, _| c.cu = vec![i32::MIN, 200],
        |c, _| c.cu = vec![],
        |c, _| c.o.o = w(over(c.i.q.ptr(), DType::Bf16, &[GT, 4, 128])),
        |c, _| c.o.o = w(ts(DType::Bf16, &[GT, 4, 128], &[512, 0, 1])),
        |c, _| {
            let p = c.i.h0.as_ref().unwrap().pool.ptr();
            c.o.committed = Some(PoolOut { pool: w(over(p, DType::F32, &[5, 4, 128, 128])), index: Some(vec![0, 4].into()) });
        },
        |c, _| {
            c.i.q = testing::in_fake_context(c.i.q.clone(), 1, 0);
            c.i.v = testing::in_fake_context(c.i.v.clone(), 2, 0);
        },
    ];
    total += fuzz("gdn prefill", 1, 400, gdn_pre, gdn_pre_breakers, run_gdn_pre);

    let gdn_dec_breakers: &[fn(&mut GdnDec, &mut rand::rngs::StdRng)] = &[
        |c, r| c.i.q = garbage(r),
        |c, r| c.i.k = garbage(r),
        |c, r| c.i.v = garbage(r),
        |c, r| c.i.g = garbage(r),
        |c, r| c.i.beta = garbage(r),
        |c, r| c.i.labels = Some(garbage(r)),
        |c, r| c.o = w(garbage(r)),
        |c, r| c.st.running = w(garbage(r)),
        |c, r| c.st.running_index = garbage(r),
        |c, r| c.st.committed.as_mut().unwrap().0 = w(garbage(r)),
        |c, r| c.st.committed.as_mut().unwrap().1 = garbage(r),
        |c, r| c.st.gsum = Some(w(garbage(r))),
        |c, r| c.st.pos = Some(w(garbage(r))),
        |c, _| c.st.pos = None,
        |c, r| c.opts.scale = bad_scale(r),
        |c, r| c.i.tokens_per_seq = [0, 9, usize::MAX][r.gen_range(0..3)],
        |c, _| c.o = w(over(c.i.v.ptr(), DType::Bf16, &[6, 4, 128])),
        |c, _| {
            let p = c.st.running.ptr();
            c.st.committed.as_mut().unwrap().0 = w(over(p, DType::F32, &[8, 4, 128, 128]));
        },
        |c, _| {
            c.o = testing::as_writable(testing::in_fake_context(c.o.view().clone(), 5, 1));
            c.i.g = testing::in_fake_context(c.i.g.clone(), 6, 1);
        },
    ];
    total += fuzz("gdn decode", 2, 400, gdn_dec, gdn_dec_breakers, run_gdn_dec);

    let sp_pre_breakers: &[fn(&mut SpPre, &mut rand::rngs::StdRng)] = &[
        |c, r| c.q = garbage(r),
        |c, r| c.k = garbage(r),
        |c, r| c.v = garbage(r),
        |c, r| c.o = garbage(r),
        |c, r| c.lse = Some(garbage(r)),
        |c, r| c.opts.q_norm_w = Some(garbage(r)),
        |c, r| c.opts.k_norm_w = Some(garbage(r)),
        |c, r| c.opts.scale = bad_scale(r),
        |c, r| c.mask = BlockMask::Routed { attn_list: garbage(r), attn_count: t(DType::I32, &[2, 6]) },
        |c, r| c.mask = BlockMask::Routed { attn_list: t(DType::I32, &[6, SSLOTS]), attn_count: garbage(r) },
        |c, r| c.mask = BlockMask::Blocks { kv_num_blocks: garbage(r), kv_indices: t(DType::I32, &[2, 12, 2, 2]) },
        |c, r| c.mask = BlockMask::Blocks { kv_num_blocks: t(DType::I32, &[2, 12, 2]), kv_indices: garbage(r) },
        |c, r| c.cu = vec![0, [-5, 0, 200, i32::MAX][r.gen_range(0..4)], 164],
        |c, _| c.cu = vec![0],
        |c, _| c.o = over(c.k.ptr(), DType::Bf16, &[ST, 12, 128]),
        |c, _| c.lse = Some(ts(DType::F32, &[ST, 12], &[1, 1])),
        |c, _| {
            c.k = testing::in_fake_context(c.k.clone(), 3, 0);
            c.o = testing::in_fake_context(c.o.clone(), 4, 0);
        },
    ];
    total += fuzz("sparse prefill", 3, 400, sp_pre, sp_pre_breakers, run_sp_pre);

    let sp_dec_breakers: &[fn(&mut SpDec, &mut rand::rngs::StdRng)] = &[
        |c, r| c.q = garbage(r),
        |c, r| c.kv.k_pages = garbage(r),
        |c, r| c.kv.v_pages = garbage(r),
        |c, r| c.kv.page_table = garbage(r),
        |c, r| c.kv.page_count = garbage(r),
        |c, r| c.kv.cur_page = garbage(r),
        |c, r| c.kv.cur_len = garbage(r),
        |c, r| c.o = garbage(r),
        |c, r| c.lse = Some(garbage(r)),
        |c, r| c.opts.q_norm_w = Some(garbage(r)),
        |c, r| c.opts.scale = bad_scale(r),
        |c, _| c.opts.num_splits = Some(0),
        |c, r| c.nq = [0, 9, usize::MAX][r.gen_range(0..3)],
        |c, _| c.o = over(c.kv.v_pages.ptr(), DType::F16, &[6, 12, 128]),
        |c, _| {
            c.kv.cur_len = testing::in_fake_context(c.kv.cur_len.clone(), 8, 0);
            c.q = testing::in_fake_context(c.q.clone(), 9, 0);
        },
    ];
    total += fuzz("sparse decode", 4, 400, sp_dec, sp_dec_breakers, run_sp_dec);

    let route_breakers: &[fn(&mut Route, &mut rand::rngs::StdRng)] = &[
        |c, r| c.x = garbage(r),
        |c, r| c.w = garbage(r),
        |c, r| c.opts.policy = [RouterPolicy::TopK(0), RouterPolicy::TopK(usize::MAX), RouterPolicy::KeepFraction(f32::NAN), RouterPolicy::KeepFraction(0.0), RouterPolicy::KeepFraction(1.5)][r.gen_range(0..5)],
        |c, _| c.layout = SeqLayout::new(&[0, 512, 513]).unwrap(),
        |c, _| {
            c.x = testing::in_fake_context(c.x.clone(), 10, 0);
            c.w = testing::in_fake_context(c.w.clone(), 11, 0);
        },
    ];
    total += fuzz("router", 5, 200, route, route_breakers, run_route);

    // cu_seqlens alone, and the view helpers on garbage: no panic (errors or not).
    let mut rng = testing::rng(6);
    for _ in 0..500 {
        let n = rng.gen_range(0..6);
        let cu: Vec<i32> = (0..n).map(|_| [0, 1, 63, 64, -1, i32::MAX, i32::MIN][rng.gen_range(0..7)]).collect();
        let r = catch_unwind(|| SeqLayout::new(&cu).map(|l| (l.num_slots(), l.min_complete_chunks(), l.seq_len(n))));
        assert!(r.is_ok(), "SeqLayout::new({cu:?}) panicked");
        let v = garbage(&mut rng);
        let o = garbage(&mut rng);
        let r = catch_unwind(AssertUnwindSafe(|| {
            let _ = (v.numel(), v.checked_numel(), v.dim(9), v.stride(9));
            let _ = v.check_layout("v", 16).and(v.check_contiguous("v")).and(v.check_shape("v", &[None, Some(3)]));
            let mut ops = natsl::tensor::Operands::new();
            ops.read("v", &v).write("o", &o).pool_rows("p", natsl::tensor::Access::Write, &o, Some(&[0, -1, i32::MAX]), 3);
            let _ = ops.check(None);
        }));
        assert!(r.is_ok(), "a view helper panicked on {v:?} / {o:?}");
        total += 2;
    }
    println!("{total} malformed calls, each an error, none a panic");
    assert!(total >= 1000);
}
