//! Tier 1 for the GDN family: every kind of malformed input returns a typed error
//! naming the argument. Runs without a GPU (views over fake device addresses are
//! never dereferenced).

use natsl::ops::gdn::*;
use natsl::{testing, DType, Error, TensorMut, TensorRef};

const BASE: u64 = 0x7f00_0000_0000;

fn fake_at(
    ptr: u64,
    dtype: DType,
    shape: &[usize],
    strides: &[usize],
    avail: usize,
) -> TensorRef<'static> {
    // SAFETY: validation never dereferences the pointer.
    unsafe { TensorRef::from_raw(ptr, avail, dtype, shape, strides) }
}
fn t(dtype: DType, shape: &[usize]) -> TensorRef<'static> {
    testing::fake_contiguous(dtype, shape)
}
/// An output of its own (outputs may not alias other tensors of the call).
fn tm(dtype: DType, shape: &[usize]) -> TensorMut<'static> {
    testing::fake_contiguous_mut(dtype, shape)
}

fn arg_of(e: Error) -> &'static str {
    testing::invalid_arg(e)
}

// A good prefill: 2 sequences (72 + 128 tokens), Hqk 2, Hv 4, dk = dv = 128, bf16.
const CU: [i32; 3] = [0, 72, 200];
const T: usize = 200;
const N: usize = 2;
const SLOTS: usize = T / 64 + N;

fn good_inputs() -> GdnPrefillInputs<'static> {
    GdnPrefillInputs {
        q: t(DType::Bf16, &[T, 2, 128]),
        k: t(DType::Bf16, &[T, 2, 128]),
        v: t(DType::Bf16, &[T, 4, 128]),
        g: t(DType::F32, &[T, 4]),
        beta: t(DType::F32, &[T, 4]),
        labels: Some(t(DType::U8, &[SLOTS, 2])),
        h0: Some(PoolIn {
            pool: t(DType::F32, &[5, 4, 128, 128]),
            index: Some(vec![4, 0].into()),
        }),
    }
}
fn good_outputs() -> GdnPrefillOutputs<'static> {
    GdnPrefillOutputs {
        o: tm(DType::Bf16, &[T, 4, 128]),
        committed: Some(PoolOut {
            pool: tm(DType::F32, &[3, 4, 128, 128]),
            index: Some(vec![2, 1].into()),
        }),
        running: Some(PoolOut {
            pool: tm(DType::F32, &[2, 4, 128, 128]),
            index: None,
        }),
        gsum_running: Some(tm(DType::F32, &[N, 4])),
    }
}
fn prefill_err(
    f: impl FnOnce(&mut GdnPrefillInputs<'static>, &mut GdnPrefillOutputs<'static>, &mut GdnOptions),
) -> Error {
    let (mut i, mut o, mut opts) = (good_inputs(), good_outputs(), GdnOptions::default());
    f(&mut i, &mut o, &mut opts);
    validate_prefill(&CU, &i, &o, &opts).unwrap_err()
}

#[test]
fn prefill_accepts_a_good_call() {
    let d = validate_prefill(&CU, &good_inputs(), &good_outputs(), &GdnOptions::default()).unwrap();
    assert_eq!(
        (d.tokens, d.seqs, d.hqk, d.hv, d.hr, d.dk, d.dv),
        (T, N, 2, 4, 2, 128, 128)
    );
    assert!(d.beta_f32);
    // Minimal call: no labels, states or gsum; beta in the activation dtype; every shipped pair.
    for (dk, dv) in [(64, 64), (128, 128), (256, 256), (128, 256), (192, 384)] {
        let i = GdnPrefillInputs {
            q: t(DType::F16, &[T, 1, dk]),
            k: t(DType::F16, &[T, 1, dk]),
            v: t(DType::F16, &[T, 3, dv]),
            g: t(DType::F32, &[T, 3]),
            beta: t(DType::F16, &[T, 3]),
            labels: None,
            h0: None,
        };
        let o = GdnPrefillOutputs {
            o: tm(DType::F16, &[T, 3, dv]),
            committed: None,
            running: None,
            gsum_running: None,
        };
        let d = validate_prefill(
            &CU,
            &i,
            &o,
            &GdnOptions {
                scale: Some(0.5),
                l2norm: true,
            },
        )
        .unwrap();
        assert!(!d.beta_f32);
    }
}

#[test]
fn prefill_accepts_strided_views_of_a_packed_projection() {
    // q, k, v as slices of one [T, 2*128 + 2*128 + 4*128] projection row.
    let row = 8 * 128;
    let mut i = good_inputs();
    i.q = fake_at(BASE, DType::Bf16, &[T, 2, 128], &[row, 128, 1], T * row);
    i.k = fake_at(
        BASE + 2 * 256,
        DType::Bf16,
        &[T, 2, 128],
        &[row, 128, 1],
        T * row - 256,
    );
    i.v = fake_at(
        BASE + 2 * 512,
        DType::Bf16,
        &[T, 4, 128],
        &[row, 128, 1],
        T * row - 512,
    );
    validate_prefill(&CU, &i, &good_outputs(), &GdnOptions::default()).unwrap();
}

#[test]
fn prefill_rejects_wrong_dtypes() {
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.q = t(DType::F32, &[T, 2, 128]))),
        "q"
    );
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.k = t(DType::F16, &[T, 2, 128]))),
        "k"
    );
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.v = t(DType::F16, &[T, 4, 128]))),
        "v"
    );
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.g = t(DType::Bf16, &[T, 4]))),
        "g"
    );
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.beta = t(DType::F16, &[T, 4]))),
        "beta"
    );
    assert_eq!(
        arg_of(prefill_err(
            |i, _, _| i.labels = Some(t(DType::I32, &[SLOTS, 2]))
        )),
        "labels"
    );
    assert_eq!(
        arg_of(prefill_err(|_, o, _| o.o = tm(DType::F16, &[T, 4, 128]))),
        "o"
    );
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.h0 = Some(PoolIn {
            pool: t(DType::Bf16, &[5, 4, 128, 128]),
            index: None
        }))),
        "h0"
    );
    assert_eq!(
        arg_of(prefill_err(
            |_, o, _| o.gsum_running = Some(tm(DType::Bf16, &[N, 4]))
        )),
        "gsum_running"
    );
}

#[test]
fn prefill_rejects_wrong_shapes() {
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.q = t(DType::Bf16, &[T, 256]))),
        "q"
    );
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.q = t(DType::Bf16, &[T - 1, 2, 128]))),
        "q"
    );
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.k = t(DType::Bf16, &[T, 1, 128]))),
        "k"
    );
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.v = t(DType::Bf16, &[T - 1, 4, 128]))),
        "v"
    );
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.g = t(DType::F32, &[T, 2]))),
        "g"
    );
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.beta = t(DType::F32, &[T]))),
        "beta"
    );
    assert_eq!(
        arg_of(prefill_err(|_, o, _| o.o = tm(DType::Bf16, &[T, 4, 64]))),
        "o"
    );
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.h0 = Some(PoolIn {
            pool: t(DType::F32, &[5, 4, 128, 64]),
            index: None
        }))),
        "h0"
    );
    assert_eq!(
        arg_of(prefill_err(|_, o, _| o.running = Some(PoolOut {
            pool: tm(DType::F32, &[2, 2, 128, 128]),
            index: None
        }))),
        "running"
    );
    assert_eq!(
        arg_of(prefill_err(
            |_, o, _| o.gsum_running = Some(tm(DType::F32, &[N + 1, 4]))
        )),
        "gsum_running"
    );
}

#[test]
fn prefill_rejects_hv_not_a_multiple_of_hqk() {
    let e = prefill_err(|i, o, _| {
        i.q = t(DType::Bf16, &[T, 3, 128]);
        i.k = t(DType::Bf16, &[T, 3, 128]);
        o.o = tm(DType::Bf16, &[T, 4, 128]);
    });
    assert_eq!(arg_of(e), "v");
}

#[test]
fn prefill_rejects_labels_of_the_wrong_size() {
    assert_eq!(
        arg_of(prefill_err(
            |i, _, _| i.labels = Some(t(DType::U8, &[SLOTS - 1, 2]))
        )),
        "labels"
    );
    assert_eq!(
        arg_of(prefill_err(
            |i, _, _| i.labels = Some(t(DType::U8, &[SLOTS, 3]))
        )),
        "labels"
    );
    assert_eq!(
        arg_of(prefill_err(
            |i, _, _| i.labels = Some(t(DType::U8, &[SLOTS * 2]))
        )),
        "labels"
    );
}

#[test]
fn prefill_rejects_state_pool_indices_out_of_range() {
    assert_eq!(
        arg_of(prefill_err(
            |i, _, _| i.h0.as_mut().unwrap().index = Some(vec![0, 5].into())
        )),
        "h0"
    );
    assert_eq!(
        arg_of(prefill_err(
            |i, _, _| i.h0.as_mut().unwrap().index = Some(vec![-1, 0].into())
        )),
        "h0"
    );
    assert_eq!(
        arg_of(prefill_err(
            |i, _, _| i.h0.as_mut().unwrap().index = Some(vec![0].into())
        )),
        "h0"
    );
    assert_eq!(
        arg_of(prefill_err(
            |_, o, _| o.committed.as_mut().unwrap().index = Some(vec![3, 0].into())
        )),
        "committed"
    );
    // Output rows must be distinct (two sequences writing one row race); h0 rows may repeat.
    assert_eq!(
        arg_of(prefill_err(
            |_, o, _| o.committed.as_mut().unwrap().index = Some(vec![1, 1].into())
        )),
        "committed"
    );
    assert_eq!(
        arg_of(prefill_err(|_, o, _| o.running.as_mut().unwrap().index = Some(vec![0, 0].into()))),
        "running"
    );
    {
        let mut i = good_inputs();
        i.h0.as_mut().unwrap().index = Some(vec![4, 4].into());
        validate_prefill(&CU, &i, &good_outputs(), &GdnOptions::default()).unwrap();
    }
    // No index: the pool needs a row per sequence.
    assert_eq!(
        arg_of(prefill_err(|_, o, _| o.running = Some(PoolOut {
            pool: tm(DType::F32, &[1, 4, 128, 128]),
            index: None
        }))),
        "running"
    );
}

#[test]
fn prefill_rejects_unsupported_head_dims() {
    // An unsupported dk names q (where dk is read), an unsupported dv for that dk names
    // v: InvalidArgument, as in the sparse family.
    let e = prefill_err(|i, o, _| {
        i.q = t(DType::Bf16, &[T, 2, 96]);
        i.k = t(DType::Bf16, &[T, 2, 96]);
        i.v = t(DType::Bf16, &[T, 4, 96]);
        o.o = tm(DType::Bf16, &[T, 4, 96]);
        i.h0 = None;
        o.committed = None;
        o.running = None;
    });
    assert_eq!(arg_of(e), "q");
    // dk 128 with dv 64 is not a shipped pair either.
    let e = prefill_err(|i, o, _| {
        i.v = t(DType::Bf16, &[T, 4, 64]);
        o.o = tm(DType::Bf16, &[T, 4, 64]);
    });
    assert_eq!(arg_of(e), "v");
}

#[test]
fn prefill_rejects_misaligned_pointers_and_strides() {
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.q = fake_at(
            BASE + 2,
            DType::Bf16,
            &[T, 2, 128],
            &[256, 128, 1],
            T * 256
        ))),
        "q"
    );
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.k = fake_at(
            BASE,
            DType::Bf16,
            &[T, 2, 128],
            &[260, 130, 1],
            T * 260
        ))),
        "k"
    );
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.v = fake_at(
            BASE + 8,
            DType::Bf16,
            &[T, 4, 128],
            &[512, 128, 1],
            T * 512
        ))),
        "v"
    );
    assert_eq!(
        arg_of(prefill_err(|_, o, _| o.o = unsafe {
            TensorMut::from_raw(BASE + 4, T * 512, DType::Bf16, &[T, 4, 128], &[512, 128, 1])
        })),
        "o"
    );
    assert_eq!(
        arg_of(prefill_err(
            |i, _, _| i.g = fake_at(BASE + 2, DType::F32, &[T, 4], &[4, 1], T * 4)
        )),
        "g"
    );
    // Last dim not contiguous.
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.q = fake_at(
            BASE,
            DType::Bf16,
            &[T, 2, 128],
            &[512, 256, 2],
            T * 512
        ))),
        "q"
    );
    // Strided view reaching past its buffer.
    assert_eq!(
        arg_of(prefill_err(|i, _, _| i.v = fake_at(
            BASE,
            DType::Bf16,
            &[T, 4, 128],
            &[1024, 128, 1],
            T * 512
        ))),
        "v"
    );
}

#[test]
fn prefill_rejects_bad_cu_seqlens_and_scale() {
    let (i, o) = (good_inputs(), good_outputs());
    let opts = GdnOptions::default();
    assert_eq!(
        arg_of(validate_prefill(&[0, 72, 72, 200], &i, &o, &opts).unwrap_err()),
        "cu_seqlens"
    );
    assert_eq!(
        arg_of(validate_prefill(&[1, 200], &i, &o, &opts).unwrap_err()),
        "cu_seqlens"
    );
    assert_eq!(
        arg_of(validate_prefill(&[0, 72, 199], &i, &o, &opts).unwrap_err()),
        "q"
    );
    assert_eq!(
        arg_of(prefill_err(|_, _, o| o.scale = Some(f32::NAN))),
        "scale"
    );
}

// ---- decode: 3 sequences, 2 tokens each, Hqk 2, Hv 4, dk = dv = 128.

const DN: usize = 3;
const DJ: usize = 2;

fn decode_parts() -> (
    GdnDecodeInputs<'static>,
    TensorMut<'static>,
    GdnDecodeState<'static>,
) {
    let rows = DN * DJ;
    let inp = GdnDecodeInputs {
        q: t(DType::Bf16, &[rows, 2, 128]),
        k: t(DType::Bf16, &[rows, 2, 128]),
        v: t(DType::Bf16, &[rows, 4, 128]),
        g: t(DType::F32, &[rows, 4]),
        beta: t(DType::Bf16, &[rows, 4]),
        labels: Some(t(DType::U8, &[DN, 4])),
        tokens_per_seq: DJ,
    };
    let st = GdnDecodeState {
        running: tm(DType::F32, &[8, 4, 128, 128]),
        running_index: t(DType::I32, &[DN]),
        committed: Some((tm(DType::F32, &[8, 4, 128, 128]), t(DType::I32, &[DN]))),
        gsum: Some(tm(DType::F32, &[DN, 4])),
        pos: Some(tm(DType::I32, &[DN])),
    };
    (inp, tm(DType::Bf16, &[rows, 4, 128]), st)
}
fn decode_err(
    f: impl FnOnce(&mut GdnDecodeInputs<'static>, &mut TensorMut<'static>, &mut GdnDecodeState<'static>),
) -> Error {
    let (mut i, mut o, mut s) = decode_parts();
    f(&mut i, &mut o, &mut s);
    validate_decode(&i, o.view(), &s, &GdnOptions::default()).unwrap_err()
}

#[test]
fn decode_accepts_a_good_call() {
    let (i, o, s) = decode_parts();
    let d = validate_decode(&i, o.view(), &s, &GdnOptions::default()).unwrap();
    assert_eq!((d.seqs, d.tokens, d.hr), (DN, DN * DJ, 4));
    // Plain GDN decode: running state only.
    let (mut i, o, mut s) = decode_parts();
    i.labels = None;
    s.committed = None;
    s.gsum = None;
    s.pos = None;
    validate_decode(&i, o.view(), &s, &GdnOptions::default()).unwrap();
}

#[test]
fn decode_rejects_malformed_inputs() {
    assert_eq!(
        arg_of(decode_err(|i, _, _| i.tokens_per_seq = 0)),
        "tokens_per_seq"
    );
    assert_eq!(
        arg_of(decode_err(|i, _, _| i.tokens_per_seq = 9)),
        "tokens_per_seq"
    );
    assert_eq!(
        arg_of(decode_err(
            |i, _, _| i.q = t(DType::Bf16, &[DN * DJ + 1, 2, 128])
        )),
        "q"
    );
    assert_eq!(
        arg_of(decode_err(|i, _, _| i.k = t(DType::Bf16, &[DN * DJ, 2, 64]))),
        "k"
    );
    assert_eq!(
        arg_of(decode_err(|i, _, _| i.g = t(DType::F16, &[DN * DJ, 4]))),
        "g"
    );
    assert_eq!(
        arg_of(decode_err(|i, _, _| i.labels = Some(t(DType::U8, &[DN, 3])))),
        "labels"
    );
    assert_eq!(
        arg_of(decode_err(
            |i, _, _| i.labels = Some(t(DType::U8, &[DN + 1, 4]))
        )),
        "labels"
    );
    assert_eq!(
        arg_of(decode_err(
            |_, o, _| *o = tm(DType::Bf16, &[DN * DJ, 4, 256])
        )),
        "o"
    );
    assert_eq!(
        arg_of(decode_err(
            |_, _, s| s.running = tm(DType::F32, &[8, 4, 128, 256])
        )),
        "running"
    );
    assert_eq!(
        arg_of(decode_err(|_, _, s| s.running_index = t(DType::U8, &[DN]))),
        "running_index"
    );
    assert_eq!(
        arg_of(decode_err(
            |_, _, s| s.committed.as_mut().unwrap().1 = t(DType::I32, &[DN + 1])
        )),
        "committed_index"
    );
    assert_eq!(arg_of(decode_err(|_, _, s| s.gsum = None)), "committed");
    assert_eq!(
        arg_of(decode_err(|_, _, s| s.gsum = Some(tm(DType::F32, &[DN, 2])))),
        "gsum"
    );
    assert_eq!(
        arg_of(decode_err(|_, _, s| s.pos = Some(tm(DType::F32, &[DN])))),
        "pos"
    );
    assert_eq!(
        arg_of(decode_err(|i, _, s| {
            s.committed = None;
            i.labels = Some(t(DType::U8, &[DN, 4]));
        })),
        "labels"
    );
    assert_eq!(
        arg_of(decode_err(|i, _, _| i.q = fake_at(
            BASE + 2,
            DType::Bf16,
            &[DN * DJ, 2, 128],
            &[256, 128, 1],
            DN * DJ * 256
        ))),
        "q"
    );
}

/// Quick NVRTC check of the GDN specs only (the full sweep is tests/nvrtc.rs):
///   NATSL_GDN_NVRTC=dk192 cargo test --release --test validation_gdn gdn_nvrtc_quick -- --ignored --nocapture
/// compiles the GDN specs whose name contains the filter and fails on spills.
#[test]
#[ignore]
fn gdn_nvrtc_quick() {
    use natsl_codegen::{catalog, emit, Op};
    if natsl::jit::ensure_nvrtc().is_err() {
        eprintln!("skipped: NVRTC not available");
        return;
    }
    let filter = std::env::var("NATSL_GDN_NVRTC").unwrap_or_default();
    let mut failures = Vec::new();
    for spec in catalog::shipped()
        .iter()
        .filter(|s| matches!(s.op, Op::GdnPrefill | Op::GdnDecode))
    {
        let unit = emit(spec).unwrap();
        if !unit.name.contains(filter.as_str()) {
            continue;
        }
        let src = format!(
            "// nonce {:?}\n{}",
            std::time::SystemTime::now(),
            unit.source
        );
        let img = natsl::jit::compile_uncached(&unit.name, &src, &natsl::jit::options(spec.arch))
            .unwrap();
        for r in natsl::jit::parse_ptxas(&img.log) {
            println!(
                "{}: {} regs, {} B stack, spills {}/{}",
                r.function, r.registers, r.stack_frame, r.spill_stores, r.spill_loads
            );
            if r.spill_stores > 0 || r.spill_loads > 0 {
                failures.push(r.function.clone());
            }
        }
    }
    assert!(failures.is_empty(), "spills: {failures:?}");
}

/// The prep (prep_grouped: one CTA per q/k head) has two smem regions (R0 = max(Q,
/// f32 A), R1 = K) and five 64 x f32 arrays, and fits 4 CTAs per SM (its launch bounds
/// ask for 4) at every catalog head-dim pair up to dk = 128.
#[test]
fn prep_kernel_smem() {
    use natsl::ops::gdn::prep_smem_bytes;
    for (dk, dv) in natsl_codegen::catalog::GDN_DIMS {
        let (dk, dv) = (dk as usize, dv as usize);
        let grp = prep_smem_bytes(dk, dv);
        let r0 = (64 * (dk + 8) * 2).max(64 * 68 * 4);
        assert_eq!(grp, r0 + 64 * (dk + 8) * 2 + 5 * 64 * 4, "dk {dk} dv {dv}");
        // V goes through R0 in chunks of min(dk, dv) columns.
        assert!(64 * (dk.min(dv) + 8) * 2 <= r0, "dk {dk} dv {dv}");
        assert!(grp <= 227 * 1024, "dk {dk} dv {dv}: {grp} B");
        if dk <= 128 {
            assert!(4 * (grp + 1024) <= 228 * 1024, "dk {dk} dv {dv}: {grp} B, fewer than 4 CTAs/SM");
        }
    }
}

/// The math of the context-parallel scan (`ScanParallel`, cuda/gdn/prefill.cuh) on the
/// f64 reference: per segment of whole chunks, the end state is affine in the start
/// state, S_end = A_s S_start + E_s, with E_s the segment run from a zero state and
/// A_s the segment run with v = 0 from the identity (ATTN chunks included); chaining
/// the segment states from h0 and rerunning every segment from its true start state
/// reproduces the whole sequence's outputs and final states.
#[test]
fn context_parallel_segment_decomposition_matches_the_reference() {
    use natsl::reference::{gdn_recurrent, GdnProblem, LABEL_ATTN, LABEL_GDN, LABEL_PARTIAL};
    use rand::Rng;
    let (dk, dv) = (16, 16); // dv = dk: the identity start state is dk x dv
    let len: usize = 64 * 7 + 20;
    let nch = len.div_ceil(64);
    let mut rng = testing::rng(5);
    let ks = (3.0 / dk as f64).sqrt();
    let q = testing::rand_vec(&mut rng, len * dk, ks);
    let k = testing::rand_vec(&mut rng, len * dk, ks);
    let v = testing::rand_vec(&mut rng, len * dv, 1.0);
    let g = testing::rand_range(&mut rng, len, -0.1, -1e-4);
    let beta = testing::rand_range(&mut rng, len, 0.05, 0.95);
    let h0 = testing::rand_vec(&mut rng, dk * dv, 0.5);
    // num_slots(t, 1) = t / 64 + 1 rows: one spare (partial) slot after the chunks.
    let labels: Vec<u8> = (0..nch + 1)
        .map(|c| {
            if (c + 1) * 64 > len {
                LABEL_PARTIAL
            } else if rng.gen_bool(0.4) {
                LABEL_ATTN
            } else {
                LABEL_GDN
            }
        })
        .collect();
    let run = |a: usize, b: usize, vv: &[f64], h: &[f64]| {
        let cu = [0i32, (b - a) as i32];
        gdn_recurrent(&GdnProblem {
            q: &q[a * dk..b * dk],
            k: &k[a * dk..b * dk],
            v: &vv[a * dv..b * dv],
            g: &g[a..b],
            beta: &beta[a..b],
            cu_seqlens: &cu,
            hqk: 1,
            hv: 1,
            dk,
            dv,
            labels: Some((&labels[a / 64..a / 64 + (b - a) / 64 + 1], 1)),
            h0: Some(h),
            scale: None,
            l2norm: false,
        })
    };
    let full = run(0, len, &v, &h0);
    let zeros = vec![0.0; dk * dv];
    let v0 = vec![0.0; len * dv];
    let ident: Vec<f64> = (0..dk * dv).map(|i| if i / dv == i % dv { 1.0 } else { 0.0 }).collect();
    for seg_len in [1, 2, 3] {
        let mut start = h0.clone();
        let mut o = Vec::new();
        let mut c0 = 0;
        loop {
            let (a, b) = (c0 * 64, ((c0 + seg_len) * 64).min(len));
            let seg = run(a, b, &v, &start);
            o.extend_from_slice(&seg.o);
            if b == len {
                let tol = 1e-10;
                assert!(testing::rel_err(&o, &full.o) < tol, "o, seg_len {seg_len}");
                assert!(testing::rel_err(&seg.state_committed, &full.state_committed) < tol);
                assert!(testing::rel_err(&seg.state_running, &full.state_running) < tol);
                break;
            }
            // Next start state from the affine decomposition (not from `seg`).
            let e = run(a, b, &v, &zeros).state_committed;
            let am = run(a, b, &v0, &ident).state_committed;
            let mut next = e.clone();
            for r in 0..dk {
                for kk in 0..dk {
                    for c in 0..dv {
                        next[r * dv + c] += am[r * dk + kk] * start[kk * dv + c];
                    }
                }
            }
            assert!(testing::rel_err(&next, &seg.state_committed) < 1e-10, "segment end state, seg_len {seg_len}, chunk {c0}");
            start = next;
            c0 += seg_len;
        }
    }
}

#[test]
fn prefill_device_indices_are_checked_for_dtype_and_length_only() {
    use natsl::workspace::WORKSPACE_ALIGN;
    let dev = |dtype, n| Some(PoolIndex::Device(t(dtype, &[n])));
    // Entries live on the device: any values pass (the kernel skips rows outside the
    // pool), so repeated or negative rows are not host errors there.
    let (mut i, mut o) = (good_inputs(), good_outputs());
    i.h0.as_mut().unwrap().index = dev(DType::I32, N);
    o.committed.as_mut().unwrap().index = dev(DType::I32, N);
    o.running.as_mut().unwrap().index = dev(DType::I32, N);
    validate_prefill(&CU, &i, &o, &GdnOptions::default()).unwrap();
    assert_eq!(arg_of(prefill_err(|i, _, _| i.h0.as_mut().unwrap().index = dev(DType::U8, N))), "h0");
    assert_eq!(arg_of(prefill_err(|_, o, _| o.committed.as_mut().unwrap().index = dev(DType::I32, N + 1))), "committed");
    assert_eq!(arg_of(prefill_err(|_, o, _| o.running.as_mut().unwrap().index = dev(DType::F32, N))), "running");

    // Workspace size: W | U | P | G, then 3 x N host indices only when a host index is
    // given (h0 and committed are host indices in good_*), then E | A with context parallelism.
    let main = workspace_bytes(SLOTS, 4, 128, 128);
    let arch = natsl::Arch::Sm90a;
    let with_host = prefill_workspace_bytes_for(arch, 132, &CU, &good_inputs(), &good_outputs(), &GdnOptions::default()).unwrap();
    let device_only = prefill_workspace_bytes_for(arch, 132, &CU, &i, &o, &GdnOptions::default()).unwrap();
    assert_eq!(with_host - device_only, (3 * N * 4).div_ceil(WORKSPACE_ALIGN) * WORKSPACE_ALIGN);
    assert!(device_only >= main && device_only % WORKSPACE_ALIGN == 0, "{device_only} vs {main}");
    // A bad call is refused by the size query too.
    let mut bad = good_inputs();
    bad.g = t(DType::Bf16, &[T, 4]);
    assert_eq!(arg_of(prefill_workspace_bytes_for(arch, 132, &CU, &bad, &good_outputs(), &GdnOptions::default()).unwrap_err()), "g");
    assert_eq!(decode_workspace_bytes(1), WORKSPACE_ALIGN);
    assert_eq!(decode_workspace_bytes(65), WORKSPACE_ALIGN * 2);
}

/// The forced fused prefill (`ScanTile::Fused`) plans only where it has a kernel (sm_90a,
/// dk 128, dv 128 or 256); elsewhere it is an error naming `variant`, never a silent
/// fallback. It needs no W / U / P / F workspace: its per-(slot, value head) records instead.
#[test]
fn fused_prefill_variant_plans_only_where_it_has_a_kernel() {
    use natsl::ops::gdn::{fused_workspace_bytes, FUSED_RECORD_BYTES};
    use natsl::workspace::WORKSPACE_ALIGN;
    let opts = GdnOptions::default();
    let host_idx = (3 * N * 4).div_ceil(WORKSPACE_ALIGN) * WORKSPACE_ALIGN;
    assert_eq!(FUSED_RECORD_BYTES, 17408);
    assert_eq!(fused_workspace_bytes(SLOTS, 4), (SLOTS * 4 * 17408).div_ceil(256) * 256);
    assert_eq!(fused_workspace_bytes(usize::MAX, 4), usize::MAX);
    let fused = PrefillVariant { tile: ScanTile::Fused, cp: ScanParallel::Off, ..Default::default() };
    // good_*: dk = dv = 128, host indices for h0 and committed (3 x N i32 in the workspace).
    let ws = prefill_workspace_bytes_variant(natsl::Arch::Sm90a, 132, &CU, &good_inputs(), &good_outputs(), &opts, fused).unwrap();
    assert_eq!(ws, fused_workspace_bytes(SLOTS, 4) + host_idx);
    let cp = PrefillVariant { cp: ScanParallel::Segments(2), ..fused };
    let ws_cp = prefill_workspace_bytes_variant(natsl::Arch::Sm90a, 132, &CU, &good_inputs(), &good_outputs(), &opts, cp).unwrap();
    assert_eq!(ws_cp - ws, natsl::ops::gdn::cp_workspace_bytes(N, 2, 4, 128, 128));
    // Host sizing (no runtime) serves both the fused plan and the other one (`Auto` without
    // a driver or TMA maps): the larger of the two.
    let other = prefill_workspace_bytes_variant(natsl::Arch::Sm90a, 132, &CU, &good_inputs(), &good_outputs(), &opts, PrefillVariant { tile: ScanTile::Wide, ..Default::default() }).unwrap();
    let host = prefill_workspace_bytes_for(natsl::Arch::Sm90a, 132, &CU, &good_inputs(), &good_outputs(), &opts).unwrap();
    let fused_auto_cp = prefill_workspace_bytes_variant(natsl::Arch::Sm90a, 132, &CU, &good_inputs(), &good_outputs(), &opts, PrefillVariant { tile: ScanTile::Fused, ..Default::default() }).unwrap();
    assert!(host >= fused_auto_cp && host >= other, "{host} vs fused {fused_auto_cp}, other {other}");
    // The sm_80 path has no fused kernel.
    let e = prefill_workspace_bytes_variant(natsl::Arch::Sm80, 132, &CU, &good_inputs(), &good_outputs(), &opts, fused).unwrap_err();
    assert_eq!(arg_of(e), "variant");
    // Nor do the other head dims (64 / 64 here; the inputs otherwise as good_*).
    let mut i = good_inputs();
    i.q = t(DType::Bf16, &[T, 2, 64]);
    i.k = t(DType::Bf16, &[T, 2, 64]);
    i.v = t(DType::Bf16, &[T, 4, 64]);
    i.h0 = None;
    let mut o = good_outputs();
    o.o = tm(DType::Bf16, &[T, 4, 64]);
    o.committed = None;
    o.running = None;
    prefill_workspace_bytes_variant(natsl::Arch::Sm90a, 132, &CU, &i, &o, &opts, PrefillVariant::default()).unwrap();
    assert_eq!(arg_of(prefill_workspace_bytes_variant(natsl::Arch::Sm90a, 132, &CU, &i, &o, &opts, fused).unwrap_err()), "variant");
    // The spec helpers agree.
    assert!(fused_supported(128, 256, natsl::Arch::Sm90a) && !fused_supported(128, 256, natsl::Arch::Sm80) && !fused_supported(192, 384, natsl::Arch::Sm90a));
    assert_eq!(fused_spec(natsl_codegen::DType::Bf16, 128, 128, natsl::Arch::Sm90a).unwrap().tile, FUSED_TILE);
    assert_eq!(natsl::ops::gdn::fused_split_smem_bytes(), 200_800);
}

/// `ScanParallel::Auto` of the fused prefill through the plan (the segments show in the
/// workspace: records, then E | A for S > 1) on the shapes of H200 run o, 132 SMs: the
/// fused rule (`cp_auto_segments_fused`, the `fused_split*` kernels' smem) picks off, off,
/// 4, 16, off, 4, 8 at P1, P2, P4, P5, P8, P9, natsl-340M.
#[test]
fn fused_prefill_auto_segments_on_the_measured_shapes() {
    use natsl::ops::gdn::{cp_workspace_bytes, fused_workspace_bytes};
    // (name, sequence lengths, Hqk, Hv, dv, segments)
    type Shape = (&'static str, &'static [usize], usize, usize, usize, usize);
    let shapes: [Shape; 7] = [
        ("P1", &[8192; 8], 16, 16, 128, 1),
        ("P2", &[8192; 8], 16, 32, 128, 1),
        ("P4", &[32768], 16, 32, 128, 4),
        ("P5", &[32768], 2, 8, 128, 16),
        ("P8", &[2048], 16, 32, 128, 1),
        ("P9", &[65536], 16, 32, 128, 4),
        ("natsl-340M", &[32768], 6, 6, 256, 8),
    ];
    for (name, lens, hqk, hv, dv, want) in shapes {
        let cu = testing::cu_seqlens(lens);
        let t_all = *cu.last().unwrap() as usize;
        let n = lens.len();
        let slots = natsl::batch::num_slots(t_all, n);
        let inp = GdnPrefillInputs {
            q: t(DType::Bf16, &[t_all, hqk, 128]),
            k: t(DType::Bf16, &[t_all, hqk, 128]),
            v: t(DType::Bf16, &[t_all, hv, dv]),
            g: t(DType::F32, &[t_all, hv]),
            beta: t(DType::F32, &[t_all, hv]),
            labels: None,
            h0: None,
        };
        let out = GdnPrefillOutputs { o: tm(DType::Bf16, &[t_all, hv, dv]), committed: None, running: None, gsum_running: None };
        let ws = |cp| prefill_workspace_bytes_variant(natsl::Arch::Sm90a, 132, &cu, &inp, &out, &GdnOptions::default(), PrefillVariant { tile: ScanTile::Fused, cp, ..Default::default() }).unwrap();
        let off = ws(ScanParallel::Off);
        assert_eq!(off, fused_workspace_bytes(slots, hv), "{name}");
        let auto = ws(ScanParallel::Auto);
        let got = (1..=64).find(|&s| auto == off + if s > 1 { cp_workspace_bytes(n, s, hv, 128, dv) } else { 0 });
        println!("{name}: fused cp Auto = {got:?}");
        assert_eq!(got, Some(want), "{name}");
    }
}

/// The forced register-state scan (`ScanTile::Reg`) plans at dk 128 (both code paths,
/// with and without context parallelism) and is an error naming `variant` at another dk,
/// never a silent fallback.
#[test]
fn reg_scan_variant_plans_only_at_dk_128() {
    use natsl::ops::gdn::{reg_scan_spec, REG_SCAN_TILE};
    let opts = GdnOptions::default();
    for arch in [natsl::Arch::Sm80, natsl::Arch::Sm90a] {
        for cp in [ScanParallel::Off, ScanParallel::Segments(2)] {
            let v = PrefillVariant { tile: ScanTile::Reg, cp, ..Default::default() };
            prefill_workspace_bytes_variant(arch, 132, &CU, &good_inputs(), &good_outputs(), &opts, v).unwrap();
        }
    }
    let mut i = good_inputs();
    i.q = t(DType::Bf16, &[T, 2, 64]);
    i.k = t(DType::Bf16, &[T, 2, 64]);
    i.v = t(DType::Bf16, &[T, 4, 64]);
    i.h0 = None;
    let mut o = good_outputs();
    o.o = tm(DType::Bf16, &[T, 4, 64]);
    o.committed = None;
    o.running = None;
    let v = PrefillVariant { tile: ScanTile::Reg, ..Default::default() };
    assert_eq!(arg_of(prefill_workspace_bytes_variant(natsl::Arch::Sm90a, 132, &CU, &i, &o, &opts, v).unwrap_err()), "variant");
    let wide = |dk, dv| natsl_codegen::catalog::gdn_prefill_spec(natsl_codegen::DType::Bf16, dk, dv, natsl::Arch::Sm90a);
    assert_eq!(reg_scan_spec(wide(128, 256)).unwrap().tile, REG_SCAN_TILE);
    assert!(reg_scan_spec(wide(64, 64)).is_none() && reg_scan_spec(wide(192, 384)).is_none());
}
