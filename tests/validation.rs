//! Tier 1: every kind of malformed input returns a typed error naming the
//! argument. Runs without a GPU: validation needs only shapes (views over fake
//! device addresses are never dereferenced).

use natsl::ops::router::{validate, RouterOptions, RouterPolicy};
use natsl::{testing, DType, SeqLayout, TensorRef};

fn fake(dtype: DType, shape: &[usize], strides: &[usize], avail: usize) -> TensorRef<'static> {
    testing::fake_view(dtype, shape, strides, avail)
}
fn contiguous(dtype: DType, shape: &[usize]) -> TensorRef<'static> {
    testing::fake_contiguous(dtype, shape)
}
fn arg_of(e: natsl::Error) -> &'static str {
    testing::invalid_arg(e)
}

#[test]
fn cu_seqlens_must_start_at_zero_rise_and_have_no_empty_sequence() {
    assert_eq!(arg_of(SeqLayout::new(&[]).unwrap_err()), "cu_seqlens");
    assert_eq!(arg_of(SeqLayout::new(&[0]).unwrap_err()), "cu_seqlens");
    assert_eq!(arg_of(SeqLayout::new(&[1, 64]).unwrap_err()), "cu_seqlens");
    assert_eq!(arg_of(SeqLayout::new(&[0, 64, 32]).unwrap_err()), "cu_seqlens");
    assert_eq!(arg_of(SeqLayout::new(&[0, 64, 64, 100]).unwrap_err()), "cu_seqlens");
    let ok = SeqLayout::new(&[0, 1, 65, 200]).unwrap();
    assert_eq!(ok.num_slots(), 200 / 64 + 3);
    assert_eq!(ok.max_chunks(), 3);
}

fn router_ok() -> (SeqLayout, TensorRef<'static>, TensorRef<'static>) {
    let layout = SeqLayout::new(&[0, 256, 512]).unwrap();
    (layout, contiguous(DType::Bf16, &[512, 1024]), contiguous(DType::Bf16, &[12, 1024]))
}

#[test]
fn router_accepts_a_good_call() {
    let (l, x, w) = router_ok();
    let plan = validate(&l, &x, &w, &RouterOptions::default()).unwrap();
    assert_eq!(plan.num_heads, 6);
    assert_eq!(plan.d_model, 1024);
    let bad = RouterOptions { policy: RouterPolicy::TopK(5), ..Default::default() };
    assert_eq!(arg_of(validate(&l, &x, &w, &bad).unwrap_err()), "policy");
}

#[test]
fn router_rejects_cu_seqlens_not_matching_t() {
    let (_, x, w) = router_ok();
    let l = SeqLayout::new(&[0, 256, 511]).unwrap();
    assert_eq!(arg_of(validate(&l, &x, &w, &RouterOptions::default()).unwrap_err()), "x");
}

#[test]
fn router_rejects_bad_x() {
    let (l, _, w) = router_ok();
    let opts = RouterOptions::default();
    // wrong dtype
    assert_eq!(arg_of(validate(&l, &contiguous(DType::F32, &[512, 1024]), &w, &opts).unwrap_err()), "x");
    // wrong rank
    assert_eq!(arg_of(validate(&l, &contiguous(DType::Bf16, &[512, 2, 512]), &w, &opts).unwrap_err()), "x");
    // last dim not contiguous
    assert_eq!(arg_of(validate(&l, &fake(DType::Bf16, &[512, 1024], &[1, 512], 1 << 20), &w, &opts).unwrap_err()), "x");
    // strides reach past the buffer
    assert_eq!(arg_of(validate(&l, &fake(DType::Bf16, &[512, 1024], &[2048, 1], 512 * 1024), &w, &opts).unwrap_err()), "x");
    // row stride not 16-byte aligned
    assert_eq!(arg_of(validate(&l, &fake(DType::Bf16, &[512, 1024], &[1027, 1], 1 << 20), &w, &opts).unwrap_err()), "x");
    // D not a multiple of 8, and D too large
    assert_eq!(arg_of(validate(&l, &contiguous(DType::Bf16, &[512, 1020]), &contiguous(DType::Bf16, &[12, 1020]), &opts).unwrap_err()), "x");
    assert_eq!(arg_of(validate(&l, &contiguous(DType::Bf16, &[512, 8200]), &contiguous(DType::Bf16, &[12, 8200]), &opts).unwrap_err()), "x");
    // empty
    assert_eq!(arg_of(validate(&l, &contiguous(DType::Bf16, &[512, 0]), &w, &opts).unwrap_err()), "x");
}

#[test]
fn router_rejects_bad_w_score() {
    let (l, x, _) = router_ok();
    let opts = RouterOptions::default();
    assert_eq!(arg_of(validate(&l, &x, &contiguous(DType::F16, &[12, 1024]), &opts).unwrap_err()), "w_score");
    assert_eq!(arg_of(validate(&l, &x, &contiguous(DType::Bf16, &[11, 1024]), &opts).unwrap_err()), "w_score");
    assert_eq!(arg_of(validate(&l, &x, &contiguous(DType::Bf16, &[130, 1024]), &opts).unwrap_err()), "w_score");
    assert_eq!(arg_of(validate(&l, &x, &contiguous(DType::Bf16, &[12, 512]), &opts).unwrap_err()), "w_score");
    assert_eq!(arg_of(validate(&l, &x, &fake(DType::Bf16, &[12, 1024], &[2048, 1], 1 << 20), &opts).unwrap_err()), "w_score");
}

#[test]
fn router_rejects_k_larger_than_the_chunk_count_and_bad_fractions() {
    let (l, x, w) = router_ok(); // 4 complete chunks per sequence
    let top = |k| RouterOptions { policy: RouterPolicy::TopK(k), ..Default::default() };
    assert!(validate(&l, &x, &w, &top(4)).is_ok());
    assert_eq!(arg_of(validate(&l, &x, &w, &top(5)).unwrap_err()), "policy");
    assert_eq!(arg_of(validate(&l, &x, &w, &top(0)).unwrap_err()), "policy");
    for f in [0.0f32, -0.5, 1.5, f32::NAN] {
        let o = RouterOptions { policy: RouterPolicy::KeepFraction(f), ..Default::default() };
        assert_eq!(arg_of(validate(&l, &x, &w, &o).unwrap_err()), "policy");
    }
}
