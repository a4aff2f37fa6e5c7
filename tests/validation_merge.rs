//! Tier 1 (no GPU): every malformed input of the merge epilogue is rejected with
//! `Error::InvalidArgument` naming the argument, before anything is launched.
#![allow(non_upper_case_globals)]

use natsl::ops::merge::{validate, validate_in, MergeInputs, MAX_HEADS};
use natsl::{testing, DType, TensorRef};

type Edit = Box<dyn Fn(&mut P)>;

fn t(dtype: DType, shape: &[usize]) -> TensorRef<'static> {
    testing::fake_contiguous(dtype, shape)
}
fn ts(dtype: DType, shape: &[usize], strides: &[usize]) -> TensorRef<'static> {
    let avail = shape.iter().zip(strides).map(|(s, st)| (s - 1) * st).sum::<usize>() + 1;
    testing::fake_view(dtype, shape, strides, avail)
}
/// `v`'s memory seen through another shape / strides / offset (for aliasing and alignment).
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

// natsl-340M-like: 12 softmax heads of 128, o_gdn a slice of the GDN output (6 heads of 256).
const T: usize = 37;
const HA: usize = 12;
const DVS: usize = 128;
const bf: DType = DType::Bf16;

struct P {
    inp: MergeInputs<'static>,
    out: TensorRef<'static>,
}

fn good() -> P {
    P {
        inp: MergeInputs {
            o_gdn: ts(DType::Bf16, &[T, HA, DVS], &[6 * 256 + 64, DVS, 1]),
            o_att: t(DType::Bf16, &[T, HA, DVS]),
            w: t(DType::F32, &[T, HA, 2]),
            gamma_gdn: t(DType::Bf16, &[DVS]),
            gamma_att: t(DType::Bf16, &[DVS]),
            z: ts(DType::Bf16, &[T, HA, DVS], &[3 * HA * DVS, DVS, 1]),
        },
        out: t(DType::Bf16, &[T, HA, DVS]),
    }
}

fn run(p: &P) -> natsl::Result<natsl::ops::merge::MergePlan> {
    validate(&p.inp, &p.out)
}

#[test]
fn good_inputs_pass() {
    let plan = run(&good()).unwrap();
    assert_eq!((plan.num_tokens, plan.num_heads, plan.dvs, plan.w_f32), (T, HA, DVS, true));
    // Logits in the activation dtype, strided (a slice of a wider GEMM output).
    let mut p = good();
    p.inp.w = ts(DType::Bf16, &[T, HA, 2], &[HA * 2 + 5, 2, 1]);
    assert!(!run(&p).unwrap().w_f32);
    // f16 and every shipped dvs; T = 1 and one head.
    for dvs in natsl_codegen::catalog::MERGE_DIMS {
        let d = dvs as usize;
        for (dt, tt, ha) in [(DType::F16, 5, 3), (DType::Bf16, 1, 1)] {
            let r = |s: &[usize]| t(dt, s);
            let p = P {
                inp: MergeInputs { o_gdn: r(&[tt, ha, d]), o_att: r(&[tt, ha, d]), w: r(&[tt, ha, 2]), gamma_gdn: r(&[d]), gamma_att: r(&[d]), z: r(&[tt, ha, d]) },
                out: r(&[tt, ha, d]),
            };
            assert_eq!(run(&p).unwrap().dvs, d);
        }
    }
}

#[test]
fn every_malformed_argument_is_named() {
    let cases: Vec<(&str, &str, Edit)> = vec![
        // dtypes
        ("o_gdn f32", "o_gdn", Box::new(|p| p.inp.o_gdn = t(DType::F32, &[T, HA, DVS]))),
        ("o_att f16", "o_att", Box::new(|p| p.inp.o_att = t(DType::F16, &[T, HA, DVS]))),
        ("z f16", "z", Box::new(|p| p.inp.z = t(DType::F16, &[T, HA, DVS]))),
        ("out f32", "out", Box::new(|p| p.out = t(DType::F32, &[T, HA, DVS]))),
        ("w i32", "w", Box::new(|p| p.inp.w = t(DType::I32, &[T, HA, 2]))),
        ("w f16 with bf16 rows", "w", Box::new(|p| p.inp.w = t(DType::F16, &[T, HA, 2]))),
        ("gamma_gdn f32", "gamma_gdn", Box::new(|p| p.inp.gamma_gdn = t(DType::F32, &[DVS]))),
        ("gamma_att f16", "gamma_att", Box::new(|p| p.inp.gamma_att = t(DType::F16, &[DVS]))),
        // shapes
        ("o_gdn rank 2", "o_gdn", Box::new(|p| p.inp.o_gdn = t(bf, &[T, HA * DVS]))),
        ("dvs 96", "o_gdn", Box::new(|p| p.inp.o_gdn = t(bf, &[T, HA, 96]))),
        ("dvs 192", "o_gdn", Box::new(|p| p.inp.o_gdn = t(bf, &[T, HA, 192]))),
        ("T = 0", "o_gdn", Box::new(|p| p.inp.o_gdn = t(bf, &[0, HA, DVS]))),
        ("too many heads", "o_gdn", Box::new(|p| p.inp.o_gdn = ts(bf, &[1, MAX_HEADS + 1, DVS], &[(MAX_HEADS + 1) * DVS, DVS, 1]))),
        ("o_att other T", "o_att", Box::new(|p| p.inp.o_att = t(bf, &[T + 1, HA, DVS]))),
        ("z other heads", "z", Box::new(|p| p.inp.z = t(bf, &[T, HA - 1, DVS]))),
        ("out other dvs", "out", Box::new(|p| p.out = t(bf, &[T, HA, 64]))),
        ("w [T, Ha, 3]", "w", Box::new(|p| p.inp.w = t(DType::F32, &[T, HA, 3]))),
        ("w [T, Ha]", "w", Box::new(|p| p.inp.w = t(DType::F32, &[T, HA]))),
        ("gamma_gdn short", "gamma_gdn", Box::new(|p| p.inp.gamma_gdn = t(bf, &[64]))),
        ("gamma_att [1, dvs]", "gamma_att", Box::new(|p| p.inp.gamma_att = t(bf, &[1, DVS]))),
        ("gamma_att strided", "gamma_att", Box::new(|p| p.inp.gamma_att = ts(bf, &[DVS], &[2]))),
        // strides, alignment, bounds
        ("o_gdn last dim strided", "o_gdn", Box::new(|p| p.inp.o_gdn = ts(bf, &[T, HA, DVS], &[HA * DVS * 2, DVS * 2, 2]))),
        ("o_att token stride not 16 B", "o_att", Box::new(|p| p.inp.o_att = ts(bf, &[T, HA, DVS], &[HA * DVS + 4, DVS, 1]))),
        ("z head stride not 16 B", "z", Box::new(|p| p.inp.z = ts(bf, &[T, HA, DVS], &[HA * (DVS + 2), DVS + 2, 1]))),
        ("out misaligned base", "out", Box::new(|p| { let o = t(bf, &[T * HA * DVS + 8]); p.out = at(&o, 4, bf, &[T, HA, DVS], &[HA * DVS, DVS, 1]); })),
        ("gamma_gdn misaligned", "gamma_gdn", Box::new(|p| { let g = t(bf, &[DVS + 8]); p.inp.gamma_gdn = at(&g, 1, bf, &[DVS], &[1]); })),
        ("w misaligned f32", "w", Box::new(|p| { let w = t(DType::F32, &[T * HA * 2 + 2]); p.inp.w = unsafe { TensorRef::from_raw(w.ptr() + 2, w.avail() - 1, DType::F32, &[T, HA, 2], &[HA * 2, 2, 1]) }; })),
        ("w last dim strided", "w", Box::new(|p| p.inp.w = ts(DType::F32, &[T, HA, 2], &[HA * 4, 4, 2]))),
        ("o_gdn buffer too short", "o_gdn", Box::new(|p| p.inp.o_gdn = testing::fake_view(bf, &[T, HA, DVS], &[HA * DVS, DVS, 1], T * HA * DVS - 1))),
        ("w buffer too short", "w", Box::new(|p| p.inp.w = testing::fake_view(DType::F32, &[T, HA, 2], &[HA * 2, 2, 1], T * HA * 2 - 1))),
        ("stride overflow", "o_att", Box::new(|p| p.inp.o_att = testing::fake_view(bf, &[T, HA, DVS], &[usize::MAX / 4, DVS, 1], usize::MAX))),
        // aliasing
        ("out is o_att", "out", Box::new(|p| p.out = at(&p.inp.o_att, 0, bf, &[T, HA, DVS], &[HA * DVS, DVS, 1]))),
        ("out overlaps z's last token", "out", Box::new(|p| { let z = t(bf, &[2 * T * HA * DVS]); p.inp.z = at(&z, 0, bf, &[T, HA, DVS], &[HA * DVS, DVS, 1]); p.out = at(&z, (T - 1) * HA * DVS, bf, &[T, HA, DVS], &[HA * DVS, DVS, 1]); })),
        ("out overlaps w", "out", Box::new(|p| { p.inp.w = at(&p.out, 0, bf, &[T, HA, 2], &[HA * DVS, DVS, 1]); })),
        ("out overlaps gamma", "out", Box::new(|p| p.inp.gamma_att = at(&p.out, 8, bf, &[DVS], &[1]))),
        ("out zero head stride", "out", Box::new(|p| p.out = ts(bf, &[T, HA, DVS], &[DVS, 0, 1]))),
        ("out heads interleave", "out", Box::new(|p| p.out = ts(bf, &[T, HA, DVS], &[HA * DVS, 64, 1]))),
    ];
    for (what, want, edit) in cases {
        let mut p = good();
        edit(&mut p);
        println!("case {what}");
        assert_eq!(arg_of(run(&p)), want, "case {what}");
    }
}

#[test]
fn inputs_may_overlap_one_another() {
    // Reads may share memory (o_gdn and z as column slices of one projection).
    let mut p = good();
    let proj = t(DType::Bf16, &[T * 2 * HA * DVS]);
    p.inp.o_gdn = at(&proj, 0, DType::Bf16, &[T, HA, DVS], &[2 * HA * DVS, DVS, 1]);
    p.inp.z = at(&proj, HA * DVS, DType::Bf16, &[T, HA, DVS], &[2 * HA * DVS, DVS, 1]);
    p.inp.o_att = p.inp.z.clone();
    run(&p).unwrap();
}

#[test]
fn views_of_another_context_are_named() {
    let ctx = |v: TensorRef<'static>, n: usize| testing::in_fake_context(v, 0x1000 * n, n);
    let mut p = good();
    p.inp.z = ctx(p.inp.z.clone(), 2);
    assert_eq!(arg_of(validate_in(Some(testing::fake_context(0x1000, 1)), &p.inp, &p.out)), "z");
    // Without a runtime: the views must agree among themselves.
    let mut p = good();
    p.inp.o_att = ctx(p.inp.o_att.clone(), 1);
    p.out = ctx(p.out.clone(), 2);
    assert_eq!(arg_of(run(&p)), "out");
}
