//! Checks of the f64 reference itself: hand-computed cases, the chunked GDN form against
//! the recurrence, limiting cases of the sparse softmax, and prefill/decode consistency.

use natsl::reference::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------- helpers

fn uniform(rng: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

fn cu_from_lens(lens: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    cu
}

/// Labels `[num_slots, hr]` from a per-(sequence, chunk, head) rule; partial last chunks
/// get LABEL_PARTIAL.
fn make_labels(cu: &[i32], hr: usize, mut rule: impl FnMut(usize, usize, usize) -> u8) -> Vec<u8> {
    let n = cu.len() - 1;
    let t = *cu.last().unwrap() as usize;
    let mut labels = vec![0u8; num_slots(t, n) * hr];
    for s in 0..n {
        let len = seq_range(cu, s).len();
        for c in 0..n_chunks(len) {
            for r in 0..hr {
                labels[(slot_base(cu, s) + c) * hr + r] = if (c + 1) * CHUNK <= len {
                    rule(s, c, r)
                } else {
                    LABEL_PARTIAL
                };
            }
        }
    }
    labels
}

/// Rows of `data` (`width` values per token) for the first `prefix[s]` tokens of each
/// sequence of the batch `cu`, packed.
fn pack_prefix(data: &[f64], cu: &[i32], prefix: &[usize], width: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for (s, &p) in prefix.iter().enumerate() {
        let start = cu[s] as usize;
        out.extend_from_slice(&data[start * width..(start + p) * width]);
    }
    out
}

fn assert_close(what: &str, out: &[f64], reference: &[f64], tol: f64) {
    let e = rel_err(out, reference);
    assert!(e <= tol, "{what}: rel_err {e:e} > {tol:e}");
}

fn assert_near(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= 1e-12 * want.abs().max(1.0),
        "{what}: got {got}, want {want}"
    );
}

/// Random GDN inputs for a batch.
struct GdnData {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    g: Vec<f64>,
    beta: Vec<f64>,
    h0: Vec<f64>,
}

fn gdn_data(
    rng: &mut StdRng,
    t: usize,
    n: usize,
    hqk: usize,
    hv: usize,
    dk: usize,
    dv: usize,
) -> GdnData {
    // Keys of norm ~0.6 keep the un-normalised delta rule stable.
    let kq = 1.0 / (dk as f64).sqrt();
    GdnData {
        q: uniform(rng, t * hqk * dk, -kq, kq),
        k: uniform(rng, t * hqk * dk, -kq, kq),
        v: uniform(rng, t * hv * dv, -1.0, 1.0),
        g: uniform(rng, t * hv, -0.4, -0.01),
        beta: uniform(rng, t * hv, 0.05, 0.95),
        h0: uniform(rng, n * hv * dk * dv, -1.0, 1.0),
    }
}

// ---------------------------------------------------------------- conventions

#[test]
fn slot_ranges_fit_and_do_not_overlap() {
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..200 {
        let lens: Vec<usize> = (0..rng.gen_range(1..6))
            .map(|_| rng.gen_range(1..300))
            .collect();
        let cu = cu_from_lens(&lens);
        let slots = num_slots(*cu.last().unwrap() as usize, lens.len());
        let mut used = vec![false; slots];
        for (s, &l) in lens.iter().enumerate() {
            for c in 0..n_chunks(l) {
                let slot = slot_base(&cu, s) + c;
                assert!(slot < slots && !used[slot], "lens {lens:?}");
                used[slot] = true;
            }
        }
    }
}

#[test]
fn rounding_helpers() {
    assert_eq!(round_bf16(1.0 / 3.0), 0.333984375);
    assert_eq!(round_f16(1.0 / 3.0), 0.333251953125);
    assert_eq!(round_none(1.0 / 3.0), 1.0 / 3.0);
    assert_eq!(round_bf16(1.5), 1.5);
}

// ---------------------------------------------------------------- router

#[test]
fn router_hand_checked() {
    // Sequence 0: 66 tokens (one complete chunk, one partial of 2); sequence 1: 64 tokens.
    let cu = [0, 66, 130];
    let mut x = Vec::new();
    for t in 0..64 {
        x.extend([1.0 + (t % 2) as f64, 2.0]); // mean (1.5, 2)
    }
    x.extend([3.0, 1.0, 5.0, 1.0]); // mean (4, 1)
    for t in 0..64 {
        x.extend([1.0 + (t % 4) as f64, -1.0]); // mean (2.5, -1)
    }
    // head 0: (ATTN, GDN) rows (1, 0), (0, 1); head 1: (0.5, 1), (1, -1).
    let w = [1.0, 0.0, 0.0, 1.0, 0.5, 1.0, 1.0, -1.0];
    for round in [round_none as fn(f64) -> f64, round_bf16] {
        let out = router(&x, &w, &cu, 2, 2, RouterPolicy::Argmax, round);
        #[rustfmt::skip]
        let logits = [
            1.5, 2.0, 2.75, -0.5, // slot 0: seq 0 chunk 0
            4.0, 1.0, 3.0, 3.0,   // slot 1: seq 0 chunk 1 (partial)
            2.5, -1.0, 0.25, 3.5, // slot 2: seq 1 chunk 0
            0.0, 0.0, 0.0, 0.0,   // slot 3: unused
        ];
        assert_eq!(out.logits, logits);
        assert_eq!(
            out.labels,
            [
                LABEL_GDN,
                LABEL_ATTN,
                LABEL_PARTIAL,
                LABEL_PARTIAL,
                LABEL_ATTN,
                LABEL_GDN,
                0,
                0
            ]
        );
        // [Hr, num_slots]: head 1 lists seq 0's chunk 0; head 0 lists seq 1's chunk 0 at slot 2.
        assert_eq!(out.attn_list, [0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(out.attn_count, [0, 1, 1, 0]);
    }
}

#[test]
fn router_top_k_and_keep_fraction() {
    let mut rng = StdRng::seed_from_u64(2);
    let lens = [1, 63, 64, 65, 130, 200, 512, 640];
    let cu = cu_from_lens(&lens);
    let (d, hr) = (8, 3);
    let t = *cu.last().unwrap() as usize;
    let x = uniform(&mut rng, t * d, -1.0, 1.0);
    let w = uniform(&mut rng, 2 * hr * d, -1.0, 1.0);
    let slots = num_slots(t, lens.len());

    let policies = [
        RouterPolicy::Argmax,
        RouterPolicy::TopK(0),
        RouterPolicy::TopK(1),
        RouterPolicy::TopK(3),
        RouterPolicy::TopK(50),
        RouterPolicy::KeepFraction(0.25),
        RouterPolicy::KeepFraction(0.5),
    ];
    for policy in policies {
        let out = router(&x, &w, &cu, d, hr, policy, round_bf16);
        for (s, &len) in lens.iter().enumerate() {
            let base = slot_base(&cu, s);
            let complete = len / CHUNK;
            for r in 0..hr {
                let margin = |c: usize| {
                    out.logits[((base + c) * hr + r) * 2]
                        - out.logits[((base + c) * hr + r) * 2 + 1]
                };
                let label = |c: usize| out.labels[(base + c) * hr + r];
                let attn: Vec<usize> = (0..complete).filter(|&c| label(c) == LABEL_ATTN).collect();
                let gdn: Vec<usize> = (0..complete).filter(|&c| label(c) == LABEL_GDN).collect();
                assert_eq!(attn.len() + gdn.len(), complete);
                if complete < n_chunks(len) {
                    assert_eq!(label(complete), LABEL_PARTIAL);
                }
                let expected = match policy {
                    RouterPolicy::Argmax => (0..complete).filter(|&c| margin(c) >= 0.0).count(),
                    RouterPolicy::TopK(k) => k.min(complete),
                    RouterPolicy::KeepFraction(rho) => keep_fraction_k(rho, complete).min(complete),
                };
                assert_eq!(attn.len(), expected, "{policy:?} seq {s} head {r}");
                if !matches!(policy, RouterPolicy::Argmax) {
                    let lo = attn
                        .iter()
                        .map(|&c| margin(c))
                        .fold(f64::INFINITY, f64::min);
                    let hi = gdn
                        .iter()
                        .map(|&c| margin(c))
                        .fold(f64::NEG_INFINITY, f64::max);
                    assert!(lo >= hi, "top-k must keep the largest margins");
                }
                // The compact list holds exactly the ATTN chunks, ascending.
                let count = out.attn_count[s * hr + r] as usize;
                let list: Vec<usize> = out.attn_list[r * slots + base..r * slots + base + count]
                    .iter()
                    .map(|&c| c as usize)
                    .collect();
                assert_eq!(list, attn);
            }
        }
        assert_eq!(
            (out.attn_list.clone(), out.attn_count.clone()),
            attn_list_from_labels(&out.labels, &cu, hr)
        );
    }
    // 8 complete chunks at rho = 0.25 keep exactly 2; 10 keep ceil(2.5) = 3.
    let out = router(
        &x,
        &w,
        &cu,
        d,
        hr,
        RouterPolicy::KeepFraction(0.25),
        round_bf16,
    );
    assert!(out.attn_count[6 * hr..7 * hr].iter().all(|&c| c == 2));
    assert!(out.attn_count[7 * hr..8 * hr].iter().all(|&c| c == 3));
}

#[test]
fn keep_fraction_k_is_exact_on_round_products() {
    assert_eq!(keep_fraction_k(0.25, 8), 2);
    assert_eq!(keep_fraction_k(0.1, 30), 3);
    assert_eq!(keep_fraction_k(0.3, 10), 3);
    assert_eq!(keep_fraction_k(0.26, 8), 3);
    assert_eq!(keep_fraction_k(0.0, 8), 0);
    assert_eq!(keep_fraction_k(1.0, 8), 8);
}

#[test]
fn router_ties() {
    let mut rng = StdRng::seed_from_u64(3);
    let (d, hr) = (4, 2);
    let cu = [0, 4 * 64 + 10];
    // Every token identical: all chunks have the same margin.
    let row = uniform(&mut rng, d, 0.5, 1.0);
    let x: Vec<f64> = (0..cu[1] as usize).flat_map(|_| row.clone()).collect();
    // Head 0: identical ATTN and GDN rows, so l0 == l1 exactly.
    let mut w = uniform(&mut rng, 2 * hr * d, -1.0, 1.0);
    let (first, rest) = w.split_at_mut(d);
    rest[..d].copy_from_slice(first);

    let out = router(&x, &w, &cu, d, hr, RouterPolicy::Argmax, round_none);
    assert!(
        (0..4).all(|c| out.labels[c * hr] == LABEL_ATTN),
        "argmax ties go to ATTN"
    );
    assert_eq!(out.labels[4 * hr], LABEL_PARTIAL);

    let out = router(&x, &w, &cu, d, hr, RouterPolicy::TopK(2), round_none);
    for r in 0..hr {
        let labels: Vec<u8> = (0..5).map(|c| out.labels[c * hr + r]).collect();
        assert_eq!(
            labels,
            [LABEL_ATTN, LABEL_ATTN, LABEL_GDN, LABEL_GDN, LABEL_PARTIAL],
            "lower index wins"
        );
    }
}

// ---------------------------------------------------------------- GDN

fn scalar_problem<'a>(
    q: &'a [f64],
    k: &'a [f64],
    v: &'a [f64],
    g: &'a [f64],
    beta: &'a [f64],
    cu: &'a [i32],
) -> GdnProblem<'a> {
    GdnProblem {
        q,
        k,
        v,
        g,
        beta,
        cu_seqlens: cu,
        hqk: 1,
        hv: 1,
        dk: 1,
        dv: 1,
        labels: None,
        h0: None,
        scale: Some(1.0),
        l2norm: false,
    }
}

#[test]
fn gdn_hand_three_tokens() {
    // dk = dv = 1, q = 2, k = 1, beta = 1/2, alpha = 1/2, v = 1, 2, 3.
    let (q, k, v) = ([2.0; 3], [1.0; 3], [1.0, 2.0, 3.0]);
    let (g, beta) = ([0.5f64.ln(); 3], [0.5; 3]);
    let cu = [0, 3];
    let p = scalar_problem(&q, &k, &v, &g, &beta, &cu);
    for f in [gdn_recurrent, gdn_chunked] {
        // From S = 0: u = 0.5, 0.875, 1.21875; S = 0.5, 1.125, 1.78125.
        let out = f(&p);
        assert_close("o", &out.o, &[1.0, 2.25, 3.5625], 1e-15);
        assert_close("running", &out.state_running, &[1.78125], 1e-15);
        assert_eq!(out.state_committed, [0.0]);
        assert_near("gsum", out.gsum_running[0], 3.0 * 0.5f64.ln());
        // From S = 1: u = 0.25, 0.8125, 1.203125; S = 0.75, 1.1875, 1.796875.
        let out = f(&GdnProblem {
            h0: Some(&[1.0]),
            ..p
        });
        assert_close("o", &out.o, &[1.5, 2.375, 3.59375], 1e-15);
        assert_close("running", &out.state_running, &[1.796875], 1e-15);
        assert_eq!(out.state_committed, [1.0]);
    }
}

#[test]
fn gdn_hand_commit_rule() {
    // 65 tokens, dk = dv = 1, q = k = v = 1, beta = 1/2, alpha = 0.9, S0 = 1. The
    // recurrence is S <- 0.45 S + 0.5, so S_t = 10/11 + 0.45^(t+1) / 11 after token t.
    let n = 65;
    let (ones, half) = (vec![1.0; n], vec![0.5; n]);
    let g = vec![0.9f64.ln(); n];
    let cu = [0, n as i32];
    let closed = |t: i32| 10.0 / 11.0 + 0.45f64.powi(t + 1) / 11.0;
    for f in [gdn_recurrent, gdn_chunked] {
        let base = GdnProblem {
            h0: Some(&[1.0]),
            ..scalar_problem(&ones, &ones, &ones, &g, &half, &cu)
        };

        // GDN: chunk 0 commits S'; token 64 continues the recurrence.
        let labels = [LABEL_GDN, LABEL_PARTIAL];
        let out = f(&GdnProblem {
            labels: Some((&labels, 1)),
            ..base
        });
        for t in 0..65 {
            assert_near("o", out.o[t], closed(t as i32));
        }
        assert_near("committed", out.state_committed[0], closed(63));
        assert_near("running", out.state_running[0], closed(64));
        assert_near("gsum", out.gsum_running[0], 0.9f64.ln());

        // ATTN: chunk 0 only decays S0 to 0.9^64; then S = 0.9^65 + 0.5 (1 - 0.9^65).
        let labels = [LABEL_ATTN, LABEL_PARTIAL];
        let out = f(&GdnProblem {
            labels: Some((&labels, 1)),
            ..base
        });
        for t in 0..64 {
            assert_near("o", out.o[t], closed(t as i32));
        }
        let a65 = 0.9f64.powi(65);
        assert_near("o[64]", out.o[64], a65 + 0.5 * (1.0 - a65));
        assert_near("committed", out.state_committed[0], 0.9f64.powi(64));
        assert_near("running", out.state_running[0], a65 + 0.5 * (1.0 - a65));
    }
}

#[test]
fn gdn_hand_l2norm_one_token() {
    // From S = 0 one token gives S = k^ (beta v)^T and o = scale (k^·q^) beta v.
    let (q, k, v) = ([1.0, 2.0], [3.0, 4.0], [1.0, -1.0]);
    let (g, beta) = ([-0.1], [0.5]);
    let cu = [0, 1];
    let p = GdnProblem {
        hqk: 1,
        hv: 1,
        dk: 2,
        dv: 2,
        scale: None,
        l2norm: true,
        ..scalar_problem(&q, &k, &v, &g, &beta, &cu)
    };
    let nk = (25.0f64 + 1e-6).sqrt();
    let kq = 11.0 / (nk * (5.0f64 + 1e-6).sqrt());
    let o = 0.5f64.sqrt() * kq * 0.5;
    for f in [gdn_recurrent, gdn_chunked] {
        let out = f(&p);
        assert_close("o", &out.o, &[o, -o], 1e-14);
        let s = [
            3.0 / nk * 0.5,
            -3.0 / nk * 0.5,
            4.0 / nk * 0.5,
            -4.0 / nk * 0.5,
        ];
        assert_close("state", &out.state_running, &s, 1e-14);
    }
}

#[test]
fn gdn_chunked_matches_recurrent() {
    let mut rng = StdRng::seed_from_u64(4);
    let lens = [1, 63, 64, 65, 130, 200];
    let cu = cu_from_lens(&lens);
    let (hqk, hv, dk, dv) = (2, 4, 8, 12);
    let t = *cu.last().unwrap() as usize;
    let data = gdn_data(&mut rng, t, lens.len(), hqk, hv, dk, dv);
    let labels2 = make_labels(&cu, 2, |_, _, _| rng.gen_range(0..2));
    let labels4 = make_labels(&cu, 4, |_, _, _| rng.gen_range(0..2));
    for labels in [
        None,
        Some((labels2.as_slice(), 2)),
        Some((labels4.as_slice(), 4)),
    ] {
        for l2norm in [false, true] {
            for h0 in [None, Some(data.h0.as_slice())] {
                let p = GdnProblem {
                    q: &data.q,
                    k: &data.k,
                    v: &data.v,
                    g: &data.g,
                    beta: &data.beta,
                    cu_seqlens: &cu,
                    hqk,
                    hv,
                    dk,
                    dv,
                    labels,
                    h0,
                    scale: None,
                    l2norm,
                };
                let (a, b) = (gdn_recurrent(&p), gdn_chunked(&p));
                let what = format!(
                    "hr {:?} l2norm {l2norm} h0 {}",
                    labels.map(|l| l.1),
                    h0.is_some()
                );
                assert_close(&format!("o, {what}"), &b.o, &a.o, 1e-12);
                assert_close(
                    &format!("committed, {what}"),
                    &b.state_committed,
                    &a.state_committed,
                    1e-12,
                );
                assert_close(
                    &format!("running, {what}"),
                    &b.state_running,
                    &a.state_running,
                    1e-12,
                );
                assert_close(
                    &format!("gsum, {what}"),
                    &b.gsum_running,
                    &a.gsum_running,
                    1e-14,
                );
            }
        }
    }
}

#[test]
fn gdn_all_gdn_labels_equal_no_labels() {
    let mut rng = StdRng::seed_from_u64(5);
    let lens = [65, 128, 3];
    let cu = cu_from_lens(&lens);
    let (hqk, hv, dk, dv) = (1, 2, 8, 8);
    let t = *cu.last().unwrap() as usize;
    let data = gdn_data(&mut rng, t, lens.len(), hqk, hv, dk, dv);
    let labels = make_labels(&cu, 2, |_, _, _| LABEL_GDN);
    let p = GdnProblem {
        q: &data.q,
        k: &data.k,
        v: &data.v,
        g: &data.g,
        beta: &data.beta,
        cu_seqlens: &cu,
        hqk,
        hv,
        dk,
        dv,
        labels: None,
        h0: Some(&data.h0),
        scale: Some(0.7),
        l2norm: true,
    };
    for f in [gdn_recurrent, gdn_chunked] {
        assert_eq!(
            f(&p),
            f(&GdnProblem {
                labels: Some((&labels, 2)),
                ..p
            })
        );
    }
}

#[test]
fn gdn_prefill_then_decode_steps_match_longer_prefill() {
    let mut rng = StdRng::seed_from_u64(6);
    let prefix = [70, 128, 5];
    let full = [210, 268, 145]; // every sequence crosses at least two chunk boundaries
    let cu = cu_from_lens(&full);
    let cu_pre = cu_from_lens(&prefix);
    let (hqk, hv, hr, dk, dv) = (2, 4, 2, 8, 6);
    let t = *cu.last().unwrap() as usize;
    let data = gdn_data(&mut rng, t, full.len(), hqk, hv, dk, dv);
    let chunk_labels: Vec<u8> = (0..full.len() * 5 * hr)
        .map(|_| rng.gen_range(0..2))
        .collect();
    let rule = |s: usize, c: usize, r: usize| chunk_labels[(s * 5 + c) * hr + r];

    let labels_full = make_labels(&cu, hr, rule);
    let labels_pre = make_labels(&cu_pre, hr, rule);
    let problem = |q, k, v, g, beta, cu, labels| GdnProblem {
        q,
        k,
        v,
        g,
        beta,
        cu_seqlens: cu,
        hqk,
        hv,
        dk,
        dv,
        labels: Some((labels, hr)),
        h0: Some(&data.h0),
        scale: None,
        l2norm: true,
    };
    let ref_full = gdn_chunked(&problem(
        &data.q,
        &data.k,
        &data.v,
        &data.g,
        &data.beta,
        &cu,
        &labels_full,
    ));
    let pre = |x: &[f64], w: usize| pack_prefix(x, &cu, &prefix, w);
    let (q, k, v) = (
        pre(&data.q, hqk * dk),
        pre(&data.k, hqk * dk),
        pre(&data.v, hv * dv),
    );
    let (g, beta) = (pre(&data.g, hv), pre(&data.beta, hv));
    let out_pre = gdn_chunked(&problem(&q, &k, &v, &g, &beta, &cu_pre, &labels_pre));

    let sd = dk * dv;
    for s in 0..full.len() {
        for i in 0..hv {
            let hk = i / (hv / hqk);
            let st = (s * hv + i) * sd..(s * hv + i + 1) * sd;
            let mut committed = out_pre.state_committed[st.clone()].to_vec();
            let mut running = out_pre.state_running[st.clone()].to_vec();
            let mut gsum = out_pre.gsum_running[s * hv + i];
            for local in prefix[s]..full[s] {
                let tok = cu[s] as usize + local;
                let qk = (tok * hqk + hk) * dk..(tok * hqk + hk + 1) * dk;
                let vr = (tok * hv + i) * dv..(tok * hv + i + 1) * dv;
                let (gt, bt) = (data.g[tok * hv + i], data.beta[tok * hv + i]);
                let o = gdn_decode_step(
                    &mut running,
                    &data.q[qk.clone()],
                    &data.k[qk],
                    &data.v[vr.clone()],
                    gt,
                    bt,
                    None,
                    true,
                );
                gsum += gt;
                assert_close(
                    &format!("o seq {s} head {i} token {local}"),
                    &o,
                    &ref_full.o[vr],
                    1e-12,
                );
                if (local + 1) % CHUNK == 0 {
                    if rule(s, local / CHUNK, i / (hv / hr)) == LABEL_ATTN {
                        committed.iter_mut().for_each(|x| *x *= gsum.exp());
                    } else {
                        committed.clone_from(&running);
                    }
                    running.clone_from(&committed);
                    gsum = 0.0;
                }
            }
            assert_close(
                "committed",
                &committed,
                &ref_full.state_committed[st.clone()],
                1e-12,
            );
            assert_close("running", &running, &ref_full.state_running[st], 1e-12);
            assert_near("gsum", gsum, ref_full.gsum_running[s * hv + i]);
        }
    }
}

// ---------------------------------------------------------------- softmax

#[test]
fn softmax_hand_two_keys() {
    // Scores of query 1: 2 and 2 + ln 3, so the weights are 1/4 and 3/4.
    let (q, k, v) = ([1.0, 2.0], [1.0, 1.0 + 3f64.ln() / 2.0], [5.0, 9.0]);
    let cu = [0, 2];
    let p = AttnProblem {
        q: &q,
        k: &k,
        v: &v,
        cu_seqlens: &cu,
        hq: 1,
        hkv: 1,
        dk: 1,
        dv: 1,
        scale: Some(1.0),
        q_norm_w: None,
        k_norm_w: None,
    };
    for out in [
        sparse_attention(&p, &[LABEL_PARTIAL], 1),
        dense_causal_attention(&p),
    ] {
        assert_close("o", &out.o, &[5.0, 8.0], 1e-15);
        assert_close("lse", &out.lse, &[1.0, 2.0 + 4f64.ln()], 1e-15);
    }
}

#[test]
fn softmax_hand_rmsnorm() {
    // One key: the lse is the scaled score of the RMS-normalised q and k.
    let (q, k, v) = ([3.0, 4.0], [1.0, -1.0], [7.0]);
    let (wq, wk) = ([1.0, 2.0], [1.0, 1.0]);
    let cu = [0, 1];
    let p = AttnProblem {
        q: &q,
        k: &k,
        v: &v,
        cu_seqlens: &cu,
        hq: 1,
        hkv: 1,
        dk: 2,
        dv: 1,
        scale: None,
        q_norm_w: Some(&wq),
        k_norm_w: Some(&wk),
    };
    let out = sparse_attention(&p, &[LABEL_PARTIAL], 1);
    let score = 0.5f64.sqrt() * (3.0 - 8.0) / ((12.5f64 + 1e-6) * (1.0f64 + 1e-6)).sqrt();
    assert_close("o", &out.o, &[7.0], 1e-15);
    assert_close("lse", &out.lse, &[score], 1e-14);
}

struct AttnData {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    wq: Vec<f64>,
    wk: Vec<f64>,
}

fn attn_data(rng: &mut StdRng, t: usize, hq: usize, hkv: usize, dk: usize, dv: usize) -> AttnData {
    AttnData {
        q: uniform(rng, t * hq * dk, -1.0, 1.0),
        k: uniform(rng, t * hkv * dk, -1.0, 1.0),
        v: uniform(rng, t * hkv * dv, -1.0, 1.0),
        wq: uniform(rng, dk, 0.5, 1.5),
        wk: uniform(rng, dk, 0.5, 1.5),
    }
}

#[test]
fn sparse_limits_dense_and_chunk_local() {
    let mut rng = StdRng::seed_from_u64(7);
    let lens = [1, 63, 64, 65, 130, 200];
    let cu = cu_from_lens(&lens);
    let (hq, hkv, dk, dv) = (4, 2, 8, 6);
    let t = *cu.last().unwrap() as usize;
    let d = attn_data(&mut rng, t, hq, hkv, dk, dv);
    // Every chunk as its own sequence: attention restricted to the own chunk.
    let chunk_lens: Vec<usize> = lens
        .iter()
        .flat_map(|&l| (0..n_chunks(l)).map(move |c| (l - c * CHUNK).min(CHUNK)))
        .collect();
    let cu_chunks = cu_from_lens(&chunk_lens);
    for norms in [false, true] {
        let p = AttnProblem {
            q: &d.q,
            k: &d.k,
            v: &d.v,
            cu_seqlens: &cu,
            hq,
            hkv,
            dk,
            dv,
            scale: None,
            q_norm_w: norms.then_some(d.wq.as_slice()),
            k_norm_w: norms.then_some(d.wk.as_slice()),
        };
        let dense = dense_causal_attention(&p);
        let local = dense_causal_attention(&AttnProblem {
            cu_seqlens: &cu_chunks,
            ..p
        });
        for hr in [1, 2] {
            let out = sparse_attention(&p, &make_labels(&cu, hr, |_, _, _| LABEL_ATTN), hr);
            assert_close("all ATTN o", &out.o, &dense.o, 1e-14);
            assert_close("all ATTN lse", &out.lse, &dense.lse, 1e-14);
            let out = sparse_attention(&p, &make_labels(&cu, hr, |_, _, _| LABEL_GDN), hr);
            assert_close("all GDN o", &out.o, &local.o, 1e-14);
            assert_close("all GDN lse", &out.lse, &local.lse, 1e-14);
        }
    }
}

#[test]
fn sparse_decode_matches_prefill_rows() {
    let mut rng = StdRng::seed_from_u64(8);
    let lens = [66, 130, 7, 64, 200];
    let cu = cu_from_lens(&lens);
    let (hq, hkv, hr, dk, dv) = (4, 2, 2, 8, 12);
    let t = *cu.last().unwrap() as usize;
    let d = attn_data(&mut rng, t, hq, hkv, dk, dv);
    let labels = make_labels(&cu, hr, |_, _, _| rng.gen_range(0..2));
    let p = AttnProblem {
        q: &d.q,
        k: &d.k,
        v: &d.v,
        cu_seqlens: &cu,
        hq,
        hkv,
        dk,
        dv,
        scale: Some(0.3),
        q_norm_w: Some(&d.wq),
        k_norm_w: Some(&d.wk),
    };
    let full = sparse_attention(&p, &labels, hr);
    for nq in [1, 3, 7] {
        let last: Vec<usize> = lens
            .iter()
            .enumerate()
            .flat_map(|(s, &l)| cu[s] as usize + l - nq..cu[s] as usize + l)
            .collect();
        let rows = |x: &[f64], w: usize| {
            last.iter()
                .flat_map(|&r| x[r * w..(r + 1) * w].to_vec())
                .collect::<Vec<_>>()
        };
        let q_new = rows(&d.q, hq * dk);
        let out = sparse_decode(&AttnProblem { q: &q_new, ..p }, &labels, hr, nq);
        assert_close("o", &out.o, &rows(&full.o, hq * dv), 1e-15);
        assert_close("lse", &out.lse, &rows(&full.lse, hq), 1e-15);
    }
}

// ---------------------------------------------------------------- merge

#[test]
fn merge_hand_checked() {
    // (a, b) = softmax(0, ln 3) = (1/4, 3/4); weight 0 goes to the GDN branch.
    let out = merge(
        &[1.0, -1.0],
        &[3.0, 4.0],
        &[0.0, 3f64.ln()],
        &[2.0, 1.0],
        &[1.0, 1.0],
        &[1.0, -2.0],
        1,
        2,
    );
    let (r1, r2) = ((1.0f64 + 1e-6).sqrt(), (12.5f64 + 1e-6).sqrt());
    let y0 = 0.25 * 2.0 / r1 + 0.75 * 3.0 / r2;
    let y1 = -0.25 / r1 + 0.75 * 4.0 / r2;
    let want = [
        y0 / (1.0 + (-1.0f64).exp()),
        y1 * -2.0 / (1.0 + 2.0f64.exp()),
    ];
    assert_close("merge", &out, &want, 1e-15);
}

// ---------------------------------------------------------------- whole layer

const DIMS: NatslDims = NatslDims {
    d_model: 16,
    h: 2,
    dk: 8,
    dv: 8,
    ha: 4,
    dks: 4,
    dvs: 4,
};

struct LayerData {
    x: Vec<f64>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    g: Vec<f64>,
    beta: Vec<f64>,
    w: Vec<f64>,
    z: Vec<f64>,
}

impl LayerData {
    fn random(rng: &mut StdRng, t: usize) -> Self {
        let d = DIMS;
        LayerData {
            x: uniform(rng, t * d.d_model, -1.0, 1.0),
            q: uniform(rng, t * d.h * d.dk, -1.0, 1.0),
            k: uniform(rng, t * d.h * d.dk, -1.0, 1.0),
            v: uniform(rng, t * d.h * d.dv, -1.0, 1.0),
            g: uniform(rng, t * d.h, -0.3, -0.01),
            beta: uniform(rng, t * d.h, 0.05, 0.95),
            w: uniform(rng, t * d.ha * 2, -2.0, 2.0),
            z: uniform(rng, t * d.ha * d.dvs, -2.0, 2.0),
        }
    }

    fn inputs(&self) -> LayerInputs<'_> {
        LayerInputs {
            x: &self.x,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            g: &self.g,
            beta: &self.beta,
            w: &self.w,
            z: &self.z,
        }
    }

    /// The first `prefix[s]` tokens of every sequence.
    fn prefix(&self, cu: &[i32], prefix: &[usize]) -> Self {
        let d = DIMS;
        let p = |x: &[f64], w: usize| pack_prefix(x, cu, prefix, w);
        LayerData {
            x: p(&self.x, d.d_model),
            q: p(&self.q, d.h * d.dk),
            k: p(&self.k, d.h * d.dk),
            v: p(&self.v, d.h * d.dv),
            g: p(&self.g, d.h),
            beta: p(&self.beta, d.h),
            w: p(&self.w, d.ha * 2),
            z: p(&self.z, d.ha * d.dvs),
        }
    }
}

struct LayerWeights {
    w_score: Vec<f64>,
    gamma_gdn: Vec<f64>,
    gamma_att: Vec<f64>,
    wq: Vec<f64>,
    wk: Vec<f64>,
}

impl LayerWeights {
    fn random(rng: &mut StdRng) -> Self {
        let d = DIMS;
        LayerWeights {
            // Large enough that the chunk means give margins well away from 0.
            w_score: uniform(rng, 2 * d.h * d.d_model, -4.0, 4.0),
            gamma_gdn: uniform(rng, d.dvs, 0.5, 1.5),
            gamma_att: uniform(rng, d.dvs, 0.5, 1.5),
            wq: uniform(rng, d.dks, 0.5, 1.5),
            wk: uniform(rng, d.dks, 0.5, 1.5),
        }
    }

    fn layer(&self) -> NatslLayer<'_> {
        NatslLayer {
            dims: DIMS,
            w_score: &self.w_score,
            gamma_gdn: &self.gamma_gdn,
            gamma_att: &self.gamma_att,
            q_norm_w: Some(&self.wq),
            k_norm_w: Some(&self.wk),
            l2norm: true,
            gdn_scale: None,
            att_scale: None,
            round: round_bf16,
        }
    }
}

fn assert_caches_close(got: &NatslCache, want: &NatslCache) {
    assert_eq!(got.pos, want.pos);
    assert_eq!(got.labels, want.labels);
    assert_eq!(got.kept_k, want.kept_k);
    assert_eq!(got.kept_v, want.kept_v);
    assert_eq!(got.cur_k, want.cur_k);
    assert_eq!(got.cur_v, want.cur_v);
    assert_close("x_sum", &got.x_sum, &want.x_sum, 1e-14);
    assert_close(
        "committed",
        &got.state_committed,
        &want.state_committed,
        1e-12,
    );
    assert_close("running", &got.state_running, &want.state_running, 1e-12);
    assert_close("gsum", &got.gsum_running, &want.gsum_running, 1e-13);
}

#[test]
fn layer_prefill_then_decode_matches_longer_prefill() {
    let mut rng = StdRng::seed_from_u64(9);
    let weights = LayerWeights::random(&mut rng);
    let layer = weights.layer();
    // Decoding starts inside a chunk (40) and at a chunk boundary (64); both cross two.
    let prefix = [40, 64];
    let full = [150, 200];
    let cu = cu_from_lens(&full);
    let data = LayerData::random(&mut rng, *cu.last().unwrap() as usize);
    let ref_full = layer_prefill(&layer, &data.inputs(), &cu);
    let pre = data.prefix(&cu, &prefix);
    let mut caches = layer_prefill(&layer, &pre.inputs(), &cu_from_lens(&prefix)).caches;

    let labels = &ref_full.router.labels;
    assert!(
        labels.contains(&LABEL_ATTN) && labels.contains(&LABEL_GDN),
        "want mixed labels"
    );
    let ow = DIMS.ha * DIMS.dvs;
    for (s, cache) in caches.iter_mut().enumerate() {
        for local in prefix[s]..full[s] {
            let tok = cu[s] as usize + local;
            let out = decode_step(&layer, cache, &data.inputs().token(tok, &DIMS));
            assert_close(
                &format!("seq {s} token {local}"),
                &out,
                &ref_full.out[tok * ow..(tok + 1) * ow],
                1e-12,
            );
        }
        assert_caches_close(cache, &ref_full.caches[s]);
    }
}

#[test]
fn layer_decode_from_empty_matches_prefill() {
    let mut rng = StdRng::seed_from_u64(10);
    let weights = LayerWeights::random(&mut rng);
    let layer = weights.layer();
    let lens = [70, 131];
    let cu = cu_from_lens(&lens);
    let data = LayerData::random(&mut rng, *cu.last().unwrap() as usize);
    let reference = layer_prefill(&layer, &data.inputs(), &cu);
    // Decode both sequences as one batch, in lockstep, while they last.
    let mut caches = vec![NatslCache::new(&DIMS); 2];
    let ow = DIMS.ha * DIMS.dvs;
    for local in 0..lens[0] {
        let toks: Vec<TokenInputs> = (0..2)
            .map(|s| data.inputs().token(cu[s] as usize + local, &DIMS))
            .collect();
        let out = decode_batch(&layer, &mut caches, &toks);
        for s in 0..2 {
            let tok = cu[s] as usize + local;
            assert_close(
                "batch",
                &out[s * ow..(s + 1) * ow],
                &reference.out[tok * ow..(tok + 1) * ow],
                1e-12,
            );
        }
    }
    for local in lens[0]..lens[1] {
        let tok = cu[1] as usize + local;
        let out = decode_step(&layer, &mut caches[1], &data.inputs().token(tok, &DIMS));
        assert_close(
            "single",
            &out,
            &reference.out[tok * ow..(tok + 1) * ow],
            1e-12,
        );
    }
    for (got, want) in caches.iter().zip(&reference.caches) {
        assert_caches_close(got, want);
    }
}

#[test]
fn layer_keep_everything_is_dense_softmax_and_decay_only_gdn() {
    // KeepFraction(1): every complete chunk ATTN. The softmax branch is then ordinary
    // causal attention, and the committed GDN state only decays (it never takes a
    // chunk): with no h0 it stays zero wherever the last chunk is complete.
    let mut rng = StdRng::seed_from_u64(11);
    let weights = LayerWeights::random(&mut rng);
    let layer = weights.layer();
    let lens = [128, 100, 1];
    let cu = cu_from_lens(&lens);
    let data = LayerData::random(&mut rng, *cu.last().unwrap() as usize);
    let all = layer_prefill_with(&layer, &data.inputs(), &cu, RouterPolicy::KeepFraction(1.0));
    for (s, &len) in lens.iter().enumerate() {
        let base = slot_base(&cu, s);
        for c in 0..n_chunks(len) {
            let want = if (c + 1) * CHUNK <= len { LABEL_ATTN } else { LABEL_PARTIAL };
            assert!(all.router.labels[(base + c) * DIMS.h..(base + c + 1) * DIMS.h].iter().all(|&l| l == want), "seq {s} chunk {c}");
        }
    }
    let b = layer_branches(&layer, &data.inputs(), &cu, &all.router.labels);
    assert_close("out", &all.out, &b.out, 0.0);
    let dense = dense_causal_attention(&AttnProblem {
        q: &data.q,
        k: &data.k,
        v: &data.v,
        cu_seqlens: &cu,
        hq: DIMS.ha,
        hkv: DIMS.ha,
        dk: DIMS.dks,
        dv: DIMS.dvs,
        scale: None,
        q_norm_w: layer.q_norm_w,
        k_norm_w: layer.k_norm_w,
    });
    assert_close("softmax branch", &b.att.o, &dense.o, 1e-12);
    let sd = DIMS.h * DIMS.dk * DIMS.dv;
    assert!(all.gdn.state_committed[..sd].iter().all(|&x| x == 0.0), "seq 0 ends on a complete ATTN chunk");
    // The argmax entry is the same composition with the argmax router's labels.
    let arg = layer_prefill(&layer, &data.inputs(), &cu);
    let b = layer_branches(&layer, &data.inputs(), &cu, &arg.router.labels);
    assert_close("argmax out", &arg.out, &b.out, 0.0);
}
