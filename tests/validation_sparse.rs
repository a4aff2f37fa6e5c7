//! Tier 1 (no GPU): every malformed input of the sparse softmax is rejected with
//! `Error::InvalidArgument` naming the argument, before anything is launched.

use natsl::ops::sparse::{validate_decode, validate_prefill, BlockMask, PagedKv, SparseOptions};
use natsl::{testing, DType, TensorRef};

type Edit<X> = Box<dyn Fn(&mut X)>;

fn t(dtype: DType, shape: &[usize]) -> TensorRef<'static> {
    testing::fake_contiguous(dtype, shape)
}
fn ts(dtype: DType, shape: &[usize], strides: &[usize]) -> TensorRef<'static> {
    let avail = shape.iter().zip(strides).map(|(s, st)| (s - 1) * st).sum::<usize>() + 1;
    testing::fake_view(dtype, shape, strides, avail)
}

fn arg_of<T: std::fmt::Debug>(r: natsl::Result<T>) -> &'static str {
    match r {
        Err(e) => testing::invalid_arg(e),
        Ok(v) => panic!("expected InvalidArgument, got Ok({v:?})"),
    }
}

// NAtS-L shapes: 2 sequences (100 + 64 tokens), 12 q heads, 12 kv heads, 6 routing heads, 64/128.
const CU: [i32; 3] = [0, 100, 164];
const T: usize = 164;
const SLOTS: usize = 164 / 64 + 2;

struct P {
    q: TensorRef<'static>,
    k: TensorRef<'static>,
    v: TensorRef<'static>,
    o: TensorRef<'static>,
    lse: Option<TensorRef<'static>>,
    mask: BlockMask<'static>,
    opts: SparseOptions<'static>,
}

fn good() -> P {
    P {
        // strided NAtS-L slice views: q/k rows of width 6*128, v rows 6*256
        q: ts(DType::Bf16, &[T, 12, 64], &[768, 64, 1]),
        k: ts(DType::Bf16, &[T, 12, 64], &[768, 64, 1]),
        v: ts(DType::Bf16, &[T, 12, 128], &[1536, 128, 1]),
        o: t(DType::Bf16, &[T, 12, 128]),
        lse: Some(t(DType::F32, &[T, 12])),
        mask: BlockMask::Routed { attn_list: t(DType::I32, &[6, SLOTS]), attn_count: t(DType::I32, &[2, 6]) },
        opts: SparseOptions { q_norm_w: Some(t(DType::Bf16, &[64])), k_norm_w: Some(t(DType::Bf16, &[64])), ..Default::default() },
    }
}

fn run(p: &P) -> natsl::Result<natsl::ops::sparse::PrefillPlan> {
    validate_prefill(&CU, &p.q, &p.k, &p.v, &p.mask, &p.opts, &p.o, p.lse.as_ref())
}

#[test]
fn prefill_good_inputs_pass() {
    let plan = run(&good()).unwrap();
    assert_eq!((plan.hq, plan.hkv, plan.hm, plan.max_chunks), (12, 12, 6, 2));
    let mut p = good();
    p.mask = BlockMask::Blocks { kv_num_blocks: t(DType::I32, &[2, 12, 2]), kv_indices: t(DType::I32, &[2, 12, 2, 2]) };
    run(&p).unwrap();
}

#[test]
fn prefill_rejects_each_malformed_argument() {
    let cases: Vec<(&str, Edit<P>)> = vec![
        ("q", Box::new(|p| p.q = t(DType::F32, &[T, 12, 64]))),
        ("q", Box::new(|p| p.q = t(DType::Bf16, &[T + 1, 12, 64]))),
        ("q", Box::new(|p| p.q = t(DType::Bf16, &[T, 12]))),
        ("q", Box::new(|p| p.q = ts(DType::Bf16, &[T, 12, 64], &[770, 64, 1]))), // misaligned row stride
        ("q", Box::new(|p| p.q = ts(DType::Bf16, &[T, 12, 64], &[768, 1, 12]))), // last dim strided
        ("k", Box::new(|p| p.k = t(DType::F16, &[T, 12, 64]))),
        ("k", Box::new(|p| p.k = t(DType::Bf16, &[T, 5, 64]))), // 5 does not divide 12
        ("k", Box::new(|p| p.k = t(DType::Bf16, &[T, 12, 128]))),
        ("v", Box::new(|p| p.v = t(DType::Bf16, &[T, 6, 128]))),
        ("v", Box::new(|p| p.v = t(DType::Bf16, &[T, 12, 96]))), // unsupported dv
        ("q", Box::new(|p| {
            p.q = t(DType::Bf16, &[T, 12, 32]);
            p.k = t(DType::Bf16, &[T, 12, 32]);
        })), // unsupported dk
        ("o", Box::new(|p| p.o = t(DType::F16, &[T, 12, 128]))),
        ("o", Box::new(|p| p.o = t(DType::Bf16, &[T, 12, 64]))),
        ("lse", Box::new(|p| p.lse = Some(t(DType::Bf16, &[T, 12])))),
        ("lse", Box::new(|p| p.lse = Some(t(DType::F32, &[T, 6])))),
        ("q_norm_w", Box::new(|p| p.opts.q_norm_w = Some(t(DType::Bf16, &[128])))),
        ("k_norm_w", Box::new(|p| p.opts.k_norm_w = Some(t(DType::F32, &[64])))),
        ("scale", Box::new(|p| p.opts.scale = Some(f32::NAN))),
        ("attn_list", Box::new(|p| p.mask = BlockMask::Routed { attn_list: t(DType::I32, &[6, SLOTS + 1]), attn_count: t(DType::I32, &[2, 6]) })),
        ("attn_list", Box::new(|p| p.mask = BlockMask::Routed { attn_list: t(DType::I32, &[5, SLOTS]), attn_count: t(DType::I32, &[2, 5]) })),
        ("attn_list", Box::new(|p| p.mask = BlockMask::Routed { attn_list: t(DType::U8, &[6, SLOTS]), attn_count: t(DType::I32, &[2, 6]) })),
        ("attn_count", Box::new(|p| p.mask = BlockMask::Routed { attn_list: t(DType::I32, &[6, SLOTS]), attn_count: t(DType::I32, &[3, 6]) })),
        ("attn_count", Box::new(|p| p.mask = BlockMask::Routed { attn_list: t(DType::I32, &[6, SLOTS]), attn_count: ts(DType::I32, &[2, 6], &[12, 2]) })),
        ("kv_num_blocks", Box::new(|p| p.mask = BlockMask::Blocks { kv_num_blocks: t(DType::I32, &[2, 12, 1]), kv_indices: t(DType::I32, &[2, 12, 1, 2]) })),
        ("kv_num_blocks", Box::new(|p| p.mask = BlockMask::Blocks { kv_num_blocks: t(DType::I32, &[2, 5, 2]), kv_indices: t(DType::I32, &[2, 5, 2, 2]) })),
        ("kv_indices", Box::new(|p| p.mask = BlockMask::Blocks { kv_num_blocks: t(DType::I32, &[2, 12, 2]), kv_indices: t(DType::I32, &[2, 12, 3, 2]) })),
    ];
    for (want, f) in cases {
        let mut p = good();
        f(&mut p);
        assert_eq!(arg_of(run(&p)), want);
    }
    // cu_seqlens itself
    let p = good();
    assert_eq!(arg_of(validate_prefill(&[0, 100, 100, 164], &p.q, &p.k, &p.v, &p.mask, &p.opts, &p.o, None)), "cu_seqlens");
}

struct D {
    q: TensorRef<'static>,
    nq: usize,
    kv: PagedKv<'static>,
    o: TensorRef<'static>,
    lse: Option<TensorRef<'static>>,
    opts: SparseOptions<'static>,
}

// 3 sequences x 2 queries, 12 q heads over 12 kv heads, 6 table heads, 40 pages of capacity 16 per list.
fn dgood() -> D {
    D {
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
        o: t(DType::F16, &[6, 12, 128]),
        lse: Some(t(DType::F32, &[6, 12])),
        opts: SparseOptions::default(),
    }
}

fn drun(d: &D) -> natsl::Result<natsl::ops::sparse::DecodePlan> {
    validate_decode(&d.q, d.nq, &d.kv, &d.opts, &d.o, d.lse.as_ref())
}

#[test]
fn decode_good_inputs_pass() {
    let plan = drun(&dgood()).unwrap();
    assert_eq!((plan.num_seqs, plan.hq, plan.hkv, plan.ht, plan.max_pages, plan.row_tiles), (3, 12, 12, 6, 16, 1));
    // Splits cover every list entry (kept pages + the current page).
    for sms in [1, 8, 132] {
        let (s, pps) = plan.splits(sms, None);
        assert!(s * pps >= 17 && (s - 1) * pps < 17, "{s} x {pps}");
    }
    assert_eq!(plan.splits(132, Some(5)).0, 5);
}

#[test]
fn decode_rejects_each_malformed_argument() {
    let cases: Vec<(&str, Edit<D>)> = vec![
        ("nq", Box::new(|d| d.nq = 0)),
        ("nq", Box::new(|d| {
            d.nq = 9;
            d.q = t(DType::F16, &[27, 12, 64]);
        })), // more than 8 queries
        ("q", Box::new(|d| d.q = t(DType::F16, &[5, 12, 64]))), // not a multiple of nq
        ("q", Box::new(|d| d.q = t(DType::F32, &[6, 12, 64]))),
        ("k_pages", Box::new(|d| d.kv.k_pages = t(DType::F16, &[40, 32, 12, 64]))), // page of 32 tokens
        ("k_pages", Box::new(|d| d.kv.k_pages = t(DType::Bf16, &[40, 64, 12, 64]))),
        ("k_pages", Box::new(|d| d.kv.k_pages = t(DType::F16, &[40, 64, 5, 64]))),
        ("v_pages", Box::new(|d| d.kv.v_pages = t(DType::F16, &[41, 64, 12, 128]))),
        ("v_pages", Box::new(|d| d.kv.v_pages = t(DType::F16, &[40, 64, 12, 96]))),
        ("page_table", Box::new(|d| d.kv.page_table = t(DType::I32, &[2, 6, 16]))),
        ("page_table", Box::new(|d| d.kv.page_table = t(DType::I32, &[3, 5, 16]))),
        ("page_table", Box::new(|d| d.kv.page_table = t(DType::F32, &[3, 6, 16]))),
        ("page_count", Box::new(|d| d.kv.page_count = t(DType::I32, &[3, 3]))),
        ("cur_page", Box::new(|d| d.kv.cur_page = t(DType::I32, &[4]))),
        ("cur_len", Box::new(|d| d.kv.cur_len = t(DType::U8, &[3]))),
        ("o", Box::new(|d| d.o = t(DType::F16, &[6, 12, 64]))),
        ("lse", Box::new(|d| d.lse = Some(t(DType::F32, &[3, 12])))),
        ("q_norm_w", Box::new(|d| d.opts.q_norm_w = Some(t(DType::F16, &[65])))),
        ("num_splits", Box::new(|d| d.opts.num_splits = Some(0))),
        ("scale", Box::new(|d| d.opts.scale = Some(f32::INFINITY))),
    ];
    for (want, f) in cases {
        let mut d = dgood();
        f(&mut d);
        assert_eq!(arg_of(drun(&d)), want);
    }
}

/// The sm_90a wgmma prefill assembles without ptxas serialising its wgmma
/// (a "wgmma ... serialized" warning means the tensor cores wait on every step).
#[test]
fn wgmma_prefill_is_not_serialized() {
    if natsl::jit::ensure_nvrtc().is_err() {
        eprintln!("skipped: NVRTC not available");
        return;
    }
    // Every shipped head-dim pair: the unit holds every wgmma entry (prefill_wgmma and
    // the warp-specialized ones), whose register pressure grows with dv.
    for (dk, dv) in natsl_codegen::catalog::SPARSE_DIMS {
        let spec = natsl_codegen::catalog::sparse_prefill_spec(natsl_codegen::DType::Bf16, natsl_codegen::HeadDims { dk, dv }, natsl_codegen::Arch::Sm90a);
        let unit = natsl_codegen::emit(&spec).unwrap();
        let src = format!("// nonce {:?}\n{}", std::time::SystemTime::now(), unit.source);
        let img = natsl::jit::compile_uncached(&unit.name, &src, &natsl::jit::options(spec.arch)).unwrap();
        println!("{}", img.log);
        assert!(!img.log.contains("serializ"), "{}", img.log);
    }
}
