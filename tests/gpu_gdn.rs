//! Tier 3 for the GDN family: prefill and decode on the device against the f64
//! reference (computed on the quantized inputs), SPEC.md section 8 tolerances.
//! Skips visibly without a device. On failure every output of the case is still
//! checked and reported (rel err, worst sequence/head, first bad element), so one
//! device run tells what is wrong.

use half::{bf16, f16};
use natsl::ops::gdn::*;
use natsl::reference::{
    self, gdn_decode_step, gdn_recurrent, GdnProblem, LABEL_ATTN, LABEL_GDN, LABEL_PARTIAL,
};
use natsl::tensor::Element;
use natsl::testing::{self, TestElem};
use natsl::{Arch, Batch, Runtime, TensorMut, TensorRef};
use rand::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Labels {
    None,
    AllGdn,
    AllAttn,
    Random,
}

#[derive(Clone, Debug)]
struct Case {
    name: &'static str,
    lens: Vec<usize>,
    hqk: usize,
    hv: usize,
    hr: usize,
    dk: usize,
    dv: usize,
    labels: Labels,
    l2norm: bool,
    h0: bool,
    beta_f32: bool,
    /// q, k, v as strided views of one packed projection row.
    packed: bool,
    /// Range of g (log-decay).
    g_lo: f64,
    seed: u64,
    /// Scan tile (forced, or the production choice).
    tile: ScanTile,
    /// Context parallelism of the scan (forced segments, or off).
    cp: ScanParallel,
    /// Queue the two launches apart (`PrefillPart::Prep`, then `Scan`).
    parts: bool,
}

impl Case {
    fn new(
        name: &'static str,
        lens: &[usize],
        hqk: usize,
        hv: usize,
        dk: usize,
        dv: usize,
    ) -> Case {
        Case {
            name,
            lens: lens.to_vec(),
            hqk,
            hv,
            hr: hqk,
            dk,
            dv,
            labels: Labels::None,
            l2norm: false,
            h0: true,
            beta_f32: true,
            packed: false,
            g_lo: -0.1,
            seed: 1,
            tile: ScanTile::Auto,
            cp: ScanParallel::Off,
            parts: false,
        }
    }
}

/// Collects check results; panics at the end with every failure.
#[derive(Default)]
struct Report {
    failures: Vec<String>,
}

impl Report {
    /// Compare `out` with `reference` (both `[rows, heads, width]` flattened).
    fn check(
        &mut self,
        what: &str,
        out: &[f64],
        reference: &[f64],
        heads: usize,
        width: usize,
        tol: f64,
    ) {
        let e = testing::rel_err(out, reference);
        let nan = out.iter().filter(|x| !x.is_finite()).count();
        println!(
            "  {what}: rel err {e:.3e} (tol {tol:.0e}){}",
            if nan > 0 {
                format!(", {nan} non-finite")
            } else {
                String::new()
            }
        );
        if e <= tol {
            return;
        }
        // Localise: worst (row, head) block, first bad element.
        let per = heads * width;
        let mut worst = (0.0f64, 0usize, 0usize);
        for r in 0..out.len() / per {
            for h in 0..heads {
                let s = r * per + h * width;
                let be = testing::rel_err(&out[s..s + width], &reference[s..s + width]);
                if be > worst.0 || !be.is_finite() {
                    worst = (be, r, h);
                    if !be.is_finite() {
                        break;
                    }
                }
            }
            if !worst.0.is_finite() {
                break;
            }
        }
        let scale =
            (reference.iter().map(|x| x * x).sum::<f64>() / reference.len().max(1) as f64).sqrt();
        let bad = out
            .iter()
            .zip(reference)
            .position(|(a, b)| !a.is_finite() || (a - b).abs() > 10.0 * tol * scale.max(b.abs()));
        let bad_s = match bad {
            Some(i) => format!(
                "first bad element {i} (row {}, head {}, col {}): got {} want {}",
                i / per,
                (i % per) / width,
                i % width,
                out[i],
                reference[i]
            ),
            None => "no single element off by 10x tol".into(),
        };
        let msg = format!("{what}: rel err {e:.3e} > {tol:.0e}; worst block row {} head {} rel err {:.3e}; {bad_s}", worst.1, worst.2, worst.0);
        println!("  FAIL {msg}");
        self.failures.push(msg);
    }
    fn finish(self, case: &str) {
        assert!(
            self.failures.is_empty(),
            "{case}: {} check(s) failed:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

/// (q, k, v, g, beta).
type Inputs = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

fn rand_inputs(c: &Case, t: usize) -> Inputs {
    let mut rng = testing::rng(c.seed);
    // Without the in-kernel norm keep ||k|| ~ 1 so the delta rule stays stable (beta ||k||^2 < 2).
    let qk_scale = if c.l2norm {
        1.0
    } else {
        (3.0 / c.dk as f64).sqrt()
    };
    let q = testing::rand_vec(&mut rng, t * c.hqk * c.dk, qk_scale);
    let k = testing::rand_vec(&mut rng, t * c.hqk * c.dk, qk_scale);
    let v = testing::rand_vec(&mut rng, t * c.hv * c.dv, 1.0);
    let g = testing::rand_range(&mut rng, t * c.hv, c.g_lo, c.g_lo * 1e-3);
    let beta = testing::rand_range(&mut rng, t * c.hv, 0.05, 0.95);
    (q, k, v, g, beta)
}

fn make_labels(c: &Case, cu: &[i32]) -> Option<Vec<u8>> {
    let n = cu.len() - 1;
    let t = *cu.last().unwrap() as usize;
    let mut rng = testing::rng(c.seed ^ 0x1abe1);
    let mut l = vec![0u8; reference::num_slots(t, n) * c.hr];
    for s in 0..n {
        let len = (cu[s + 1] - cu[s]) as usize;
        let base = reference::slot_base(cu, s);
        for ch in 0..reference::n_chunks(len) {
            for r in 0..c.hr {
                l[(base + ch) * c.hr + r] = if (ch + 1) * 64 > len {
                    LABEL_PARTIAL
                } else {
                    match c.labels {
                        Labels::None | Labels::AllGdn => LABEL_GDN,
                        Labels::AllAttn => LABEL_ATTN,
                        Labels::Random => {
                            if rng.gen_bool(0.4) {
                                LABEL_ATTN
                            } else {
                                LABEL_GDN
                            }
                        }
                    }
                };
            }
        }
    }
    (c.labels != Labels::None).then_some(l)
}

fn run_prefill<T: TestElem + Element>(rt: &Runtime, c: &Case) {
    println!(
        "case {} ({:?}, {}): {c:?}",
        c.name,
        rt.arch(),
        std::any::type_name::<T>()
    );
    let cu = testing::cu_seqlens(&c.lens);
    let t = *cu.last().unwrap() as usize;
    let n = c.lens.len();
    let (q, k, v, g, beta) = rand_inputs(c, t);
    let (q, k, v) = (
        testing::quantize::<T>(&q),
        testing::quantize::<T>(&k),
        testing::quantize::<T>(&v),
    );
    let g = testing::quantize::<f32>(&g);
    let beta = if c.beta_f32 {
        testing::quantize::<f32>(&beta)
    } else {
        testing::quantize::<T>(&beta)
    };
    let sd = c.hv * c.dk * c.dv;
    let h0 = c.h0.then(|| {
        let mut rng = testing::rng(c.seed ^ 0x40);
        testing::quantize::<f32>(&testing::rand_vec(&mut rng, n * sd, 0.5))
    });
    let labels = make_labels(c, &cu);
    let prob = GdnProblem {
        q: &q,
        k: &k,
        v: &v,
        g: &g,
        beta: &beta,
        cu_seqlens: &cu,
        hqk: c.hqk,
        hv: c.hv,
        dk: c.dk,
        dv: c.dv,
        labels: labels.as_deref().map(|l| (l, c.hr)),
        h0: h0.as_deref(),
        scale: None,
        l2norm: c.l2norm,
    };
    let t0 = std::time::Instant::now();
    let want = gdn_recurrent(&prob);
    println!("  reference: {:.2} s", t0.elapsed().as_secs_f64());

    // Device inputs.
    let batch = Batch::new(rt, &cu).unwrap();
    let (qd, kd, vd, packed_d);
    let row = 2 * c.hqk * c.dk + c.hv * c.dv;
    if c.packed {
        let mut p = vec![0.0; t * row];
        for tt in 0..t {
            p[tt * row..tt * row + c.hqk * c.dk]
                .copy_from_slice(&q[tt * c.hqk * c.dk..(tt + 1) * c.hqk * c.dk]);
            p[tt * row + c.hqk * c.dk..tt * row + 2 * c.hqk * c.dk]
                .copy_from_slice(&k[tt * c.hqk * c.dk..(tt + 1) * c.hqk * c.dk]);
            p[tt * row + 2 * c.hqk * c.dk..(tt + 1) * row]
                .copy_from_slice(&v[tt * c.hv * c.dv..(tt + 1) * c.hv * c.dv]);
        }
        packed_d = Some(testing::upload::<T>(rt, &p).unwrap());
        (qd, kd, vd) = (None, None, None);
    } else {
        packed_d = None;
        qd = Some(testing::upload::<T>(rt, &q).unwrap());
        kd = Some(testing::upload::<T>(rt, &k).unwrap());
        vd = Some(testing::upload::<T>(rt, &v).unwrap());
    }
    let gd = testing::upload::<f32>(rt, &g).unwrap();
    let betad_f = c
        .beta_f32
        .then(|| testing::upload::<f32>(rt, &beta).unwrap());
    let betad_t = (!c.beta_f32).then(|| testing::upload::<T>(rt, &beta).unwrap());
    let labd = labels.as_ref().map(|l| rt.stream().clone_htod(l).unwrap());
    // Pools with index maps (rows permuted, extra rows left poisoned).
    let rows = n + 2;
    // s -> (s * m + 1) % rows with m coprime to rows: injective. (A fixed m = 3 mapped
    // several sequences to one row whenever 3 | n + 2, e.g. the 7-sequence cp-ragged
    // case: shared h0 rows and racing committed writes, not a kernel error.)
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let m = (3..).step_by(2).find(|&m| gcd(m, rows) == 1).unwrap();
    let perm: Vec<i32> = (0..n).map(|s| ((s * m + 1) % rows) as i32).collect();
    {
        let mut seen = vec![false; rows];
        for &r in &perm {
            assert!(!std::mem::replace(&mut seen[r as usize], true), "test pool index map is not injective: {perm:?}");
        }
    }
    let mut h0_pool = vec![0.0; rows * sd];
    if let Some(h0) = &h0 {
        for s in 0..n {
            let r = perm[s] as usize;
            h0_pool[r * sd..(r + 1) * sd].copy_from_slice(&h0[s * sd..(s + 1) * sd]);
        }
    }
    let h0d = testing::upload::<f32>(rt, &h0_pool).unwrap();
    let mut failures = Vec::new();
    {
        let mut od = testing::poisoned::<T>(rt, t * c.hv * c.dv).unwrap();
        let mut comd = testing::poisoned::<f32>(rt, rows * sd).unwrap();
        let mut rund = testing::poisoned::<f32>(rt, n * sd).unwrap();
        let mut gsd = testing::poisoned::<f32>(rt, n * c.hv).unwrap();

        {
            let (q_t, k_t, v_t) = match &packed_d {
                Some(p) => (
                    TensorRef::strided(p, &[t, c.hqk, c.dk], &[row, c.dk, 1]),
                    // SAFETY: offsets inside the packed buffer; validation checks the extents.
                    unsafe {
                        TensorRef::from_raw(
                            TensorRef::new(p, &[t * row]).ptr()
                                + (c.hqk * c.dk * T::DTYPE.size()) as u64,
                            t * row - c.hqk * c.dk,
                            T::DTYPE,
                            &[t, c.hqk, c.dk],
                            &[row, c.dk, 1],
                        )
                    },
                    unsafe {
                        TensorRef::from_raw(
                            TensorRef::new(p, &[t * row]).ptr()
                                + (2 * c.hqk * c.dk * T::DTYPE.size()) as u64,
                            t * row - 2 * c.hqk * c.dk,
                            T::DTYPE,
                            &[t, c.hv, c.dv],
                            &[row, c.dv, 1],
                        )
                    },
                ),
                None => (
                    TensorRef::new(qd.as_ref().unwrap(), &[t, c.hqk, c.dk]),
                    TensorRef::new(kd.as_ref().unwrap(), &[t, c.hqk, c.dk]),
                    TensorRef::new(vd.as_ref().unwrap(), &[t, c.hv, c.dv]),
                ),
            };
            let beta_t = match (&betad_f, &betad_t) {
                (Some(b), _) => TensorRef::new(b, &[t, c.hv]),
                (_, Some(b)) => TensorRef::new(b, &[t, c.hv]),
                _ => unreachable!(),
            };
            let inp = GdnPrefillInputs {
                q: q_t,
                k: k_t,
                v: v_t,
                g: TensorRef::new(&gd, &[t, c.hv]),
                beta: beta_t,
                labels: labd
                    .as_ref()
                    .map(|l| TensorRef::new(l, &[l.len() / c.hr, c.hr])),
                h0: c.h0.then(|| PoolIn {
                    pool: TensorRef::new(&h0d, &[rows, c.hv, c.dk, c.dv]),
                    index: Some(perm.clone().into()),
                }),
            };
            let mut out = GdnPrefillOutputs {
                o: TensorMut::new(&mut od, &[t, c.hv, c.dv]),
                committed: Some(PoolOut {
                    pool: TensorMut::new(&mut comd, &[rows, c.hv, c.dk, c.dv]),
                    index: Some(perm.iter().rev().cloned().collect::<Vec<i32>>().into()),
                }),
                running: Some(PoolOut {
                    pool: TensorMut::new(&mut rund, &[n, c.hv, c.dk, c.dv]),
                    index: None,
                }),
                gsum_running: Some(TensorMut::new(&mut gsd, &[n, c.hv])),
            };
            let opts = GdnOptions {
                scale: None,
                l2norm: c.l2norm,
            };
            let mut ws = GdnWorkspace::new();
            let t1 = std::time::Instant::now();
            let parts: &[Option<PrefillPart>] = if c.parts { &[Some(PrefillPart::Prep), Some(PrefillPart::Scan)] } else { &[None] };
            for &part in parts {
                gdn_prefill_variant(rt, &batch, &inp, &mut out, &opts, &mut ws, PrefillVariant { tile: c.tile, cp: c.cp, part }).unwrap();
            }
            rt.synchronize().unwrap();
            println!(
                "  device: {:.2} ms (incl. first-use JIT)",
                t1.elapsed().as_secs_f64() * 1e3
            );
        }

        let tol = testing::tolerance(T::DTYPE);
        let mut rep = Report::default();
        let o = testing::download(rt, &od).unwrap();
        rep.check("o", &o, &want.o, c.hv, c.dv, tol);
        // Split o into first chunks (intra-chunk path + h0) and later chunks (state path).
        let (mut o1, mut r1, mut o2, mut r2) = (vec![], vec![], vec![], vec![]);
        for s in 0..n {
            for tt in cu[s] as usize..cu[s + 1] as usize {
                let sl = tt * c.hv * c.dv..(tt + 1) * c.hv * c.dv;
                if tt - (cu[s] as usize) < 64 {
                    o1.extend_from_slice(&o[sl.clone()]);
                    r1.extend_from_slice(&want.o[sl]);
                } else {
                    o2.extend_from_slice(&o[sl.clone()]);
                    r2.extend_from_slice(&want.o[sl]);
                }
            }
        }
        println!(
            "  o first chunks rel err {:.3e}, later chunks {:.3e}",
            testing::rel_err(&o1, &r1),
            if o2.is_empty() {
                0.0
            } else {
                testing::rel_err(&o2, &r2)
            }
        );
        let com = testing::download(rt, &comd).unwrap();
        let cidx: Vec<i32> = perm.iter().rev().cloned().collect();
        let com_g: Vec<f64> = (0..n)
            .flat_map(|s| com[cidx[s] as usize * sd..(cidx[s] as usize + 1) * sd].to_vec())
            .collect();
        rep.check(
            "state_committed",
            &com_g,
            &want.state_committed,
            c.hv,
            c.dk * c.dv,
            tol,
        );
        let run = testing::download(rt, &rund).unwrap();
        rep.check(
            "state_running",
            &run,
            &want.state_running,
            c.hv,
            c.dk * c.dv,
            tol,
        );
        let gs = testing::download(rt, &gsd).unwrap();
        let gs_err: f64 = gs
            .iter()
            .zip(&want.gsum_running)
            .map(|(a, b)| {
                if a.is_finite() {
                    (a - b).abs()
                } else {
                    f64::INFINITY
                }
            })
            .fold(0.0, f64::max);
        println!("  gsum_running: max abs err {gs_err:.3e}");
        if gs_err.is_nan() || gs_err > 1e-4 {
            rep.failures.push(format!(
                "gsum_running: max abs err {gs_err:.3e} > 1e-4 (got {:?}, want {:?})",
                &gs[..gs.len().min(8)],
                &want.gsum_running[..gs.len().min(8)]
            ));
        }
        failures.extend(rep.failures);
    }
    // Every index of these cases is in range and every label valid: no fault may be recorded.
    let faults = rt.device_faults().unwrap();
    if !faults.is_empty() {
        failures.push(format!("device faults on a well-formed call: {faults}"));
    }
    Report { failures }.finish(c.name);
}

fn for_arches(test: &str, f: impl Fn(&Runtime)) {
    let Some(rt) = testing::gpu_or_skip(test) else {
        return;
    };
    f(&rt);
    if rt.arch() != Arch::Sm80 {
        let rt80 = Runtime::with_arch(0, Arch::Sm80).unwrap();
        f(&rt80);
    }
}

const RAGGED: [usize; 6] = [1, 63, 64, 65, 200, 1000];

#[test]
fn prefill_ragged_plain_gdn_every_head_dim_pair() {
    for_arches("prefill_ragged_plain_gdn_every_head_dim_pair", |rt| {
        for (dk, dv) in [(64, 64), (128, 128), (256, 256), (128, 256), (192, 384)] {
            let mut c = Case::new("plain", &RAGGED, 1, 2, dk, dv);
            // Both scan tiles of Auto's choice where dk = 128 has two (wide, register-state).
            for tile in [ScanTile::Wide, ScanTile::Reg] {
                c.tile = tile;
                run_prefill::<bf16>(rt, &c);
                if dk != 128 {
                    break;
                }
            }
        }
    });
}

/// `ScanTile::Reg` (scan_reg n32w4, dk 128: state only in registers, transposed; one
/// CTA barrier + one pair barrier per chunk): dv 128 and 256, ragged, random labels,
/// l2norm, h0; GVA f16; many heads (more than one default CTA per SM, where Auto would
/// not pick it); context parallelism (pass A's offset / transition tiles and pass C run
/// scan_reg too); long sequences (16384 and 65536 tokens, long memory).
#[test]
fn prefill_reg_scan_tile() {
    for_arches("prefill_reg_scan_tile", |rt| {
        for (dk, dv) in [(128, 128), (128, 256)] {
            let mut c = Case::new("reg", &RAGGED, 1, 2, dk, dv);
            c.tile = ScanTile::Reg;
            c.labels = Labels::Random;
            c.hr = 1;
            c.l2norm = true;
            c.seed = 41;
            run_prefill::<bf16>(rt, &c);
        }
        let mut c = Case::new("reg-gva-f16", &RAGGED, 2, 4, 128, 128);
        c.tile = ScanTile::Reg;
        c.labels = Labels::Random;
        c.hr = 2;
        c.beta_f32 = false;
        run_prefill::<f16>(rt, &c);
        c.labels = Labels::AllAttn;
        run_prefill::<bf16>(rt, &c);
        // More than one default CTA per SM (many heads).
        for (dk, dv, hv) in [(128, 128, 16), (128, 256, 12)] {
            let mut c = Case::new("reg-wide", &RAGGED, hv / 2, hv, dk, dv);
            c.tile = ScanTile::Reg;
            c.labels = Labels::Random;
            c.hr = hv / 2;
            c.l2norm = true;
            c.seed = 43;
            run_prefill::<bf16>(rt, &c);
        }
        // Context parallelism on the register-state tile.
        for segs in [2, 3, 7, 16] {
            let mut c = Case::new("reg-cp-single", &[1000], 1, 2, 128, 128);
            c.tile = ScanTile::Reg;
            c.labels = Labels::Random;
            c.hr = 1;
            c.seed = 47 + segs as u64;
            c.cp = ScanParallel::Segments(segs);
            run_prefill::<bf16>(rt, &c);
        }
        for (dk, dv) in [(128, 128), (128, 256)] {
            let mut c = Case::new("reg-cp-ragged", &[1, 63, 64, 65, 200, 1000, 640], 1, 2, dk, dv);
            c.tile = ScanTile::Reg;
            c.labels = Labels::Random;
            c.hr = 1;
            c.l2norm = true;
            c.seed = 53;
            c.cp = ScanParallel::Segments(4);
            run_prefill::<bf16>(rt, &c);
        }
        let mut c = Case::new("reg-cp-f16", &RAGGED, 2, 4, 128, 128);
        c.tile = ScanTile::Reg;
        c.labels = Labels::Random;
        c.hr = 2;
        c.beta_f32 = false;
        c.cp = ScanParallel::Segments(3);
        run_prefill::<f16>(rt, &c);
    });
    if let Some(rt) = testing::gpu_or_skip("prefill_reg_scan_tile long") {
        let mut c = Case::new("reg-long", &[16384], 1, 2, 128, 128);
        c.tile = ScanTile::Reg;
        c.l2norm = true;
        c.g_lo = -0.02;
        run_prefill::<bf16>(&rt, &c);
        c.cp = ScanParallel::Segments(8);
        run_prefill::<bf16>(&rt, &c);
        let mut c = Case::new("reg-long-65536", &[65536], 1, 1, 128, 128);
        c.tile = ScanTile::Reg;
        c.l2norm = true;
        c.g_lo = -0.02;
        run_prefill::<bf16>(&rt, &c);
        c.labels = Labels::Random;
        c.hr = 1;
        c.l2norm = false;
        run_prefill::<f16>(&rt, &c);
    }
}

/// The fused sm_90a prefill, split (`ScanTile::Fused`, cuda/gdn/fused.cuh: `fused_prep`
/// writes each chunk's T diag(beta), P and row factors; the fused kernel TMA-loads them
/// with q, k, v beside the state update in wgmma accumulators) on the cases of the
/// current kernels, at the dims it serves (dk 128, dv 128 / 256): ragged
/// plain GDN; random labels, l2norm, h0; GVA in f16 with beta in the activation dtype;
/// all-ATTN labels; many heads; the NAtS-L shapes as packed strided views without h0;
/// context parallelism (single sequence in 2, 3, 7, 16 segments, ragged batches, f16,
/// Auto); long sequences (16384, 65536). sm_90a only: on the sm_80 path (and at other
/// dims) the forced variant is an error, checked here and in tests/validation_gdn.rs.
#[test]
fn prefill_fused_tile() {
    let Some(rt) = testing::gpu_or_skip("prefill_fused_tile") else {
        return;
    };
    if rt.arch() != Arch::Sm90a {
        println!("skipped: the fused prefill is sm_90a only ({:?})", rt.arch());
        return;
    }
    fused_cases(&rt, ScanTile::Fused);
    // The forced variant where it has no kernel is an error naming `variant`.
    let rt80 = Runtime::with_arch(0, Arch::Sm80).unwrap();
    for (r, dk, dv) in [(&rt80, 128, 128), (&rt, 64, 64), (&rt, 192, 384)] {
        let cu = testing::cu_seqlens(&[100]);
        let e = fused_call_error(r, &cu, dk, dv, ScanTile::Fused);
        println!("  Fused on {:?} dk {dk} dv {dv}: {e}", r.arch());
        assert_eq!(testing::invalid_arg(e), "variant");
    }
}

/// The fused prefill's halves queued apart (`PrefillPart::Prep`, then `Scan` reading
/// the records the first left), as the bench times them: the same outputs as one call.
#[test]
fn prefill_fused_split_parts() {
    let Some(rt) = testing::gpu_or_skip("prefill_fused_split_parts") else {
        return;
    };
    if rt.arch() != Arch::Sm90a {
        println!("skipped: the fused prefill is sm_90a only ({:?})", rt.arch());
        return;
    }
    for (dv, cp) in [(128, ScanParallel::Off), (256, ScanParallel::Segments(3))] {
        let mut c = Case::new("fused-parts", &RAGGED, 1, 4, 128, dv);
        c.tile = ScanTile::Fused;
        c.labels = Labels::Random;
        c.hr = 2;
        c.l2norm = true;
        c.cp = cp;
        c.parts = true;
        run_prefill::<bf16>(&rt, &c);
    }
}

/// `ScanTile::Auto` at the fused prefill's dims (sm_90a: the fused prefill wherever it has
/// a kernel), with its context-parallel choice: CTAs filling the GPU (8 sequences x
/// ceil(SMs / 8) value heads, cp off) and few CTAs (one sequence of 2048 tokens, 4 value
/// heads: cp Auto splits it, 8 segments on 132 SMs; and cp off).
#[test]
fn prefill_auto_fused() {
    let Some(rt) = testing::gpu_or_skip("prefill_auto_fused") else {
        return;
    };
    let hv = (rt.sm_count() as usize).div_ceil(8);
    let mut c = Case::new("auto-fused", &[100, 64, 130, 1, 77, 200, 63, 65], hv, hv, 128, 128);
    c.labels = Labels::Random;
    c.l2norm = true;
    run_prefill::<bf16>(&rt, &c);
    for (dv, cp) in [(128, ScanParallel::Auto), (256, ScanParallel::Auto), (128, ScanParallel::Off)] {
        let mut c = Case::new("auto-fused-few", &[2048], 2, 4, 128, dv);
        c.labels = Labels::Random;
        c.hr = 2;
        c.l2norm = true;
        c.cp = cp;
        run_prefill::<bf16>(&rt, &c);
    }
}

/// `prefill_fused_tile`'s cases on the fused prefill's phase-timer build (it must time
/// the kernel that computes the right thing).
#[test]
fn prefill_fused_profile_build() {
    let Some(rt) = testing::gpu_or_skip("prefill_fused_profile_build") else {
        return;
    };
    if rt.arch() != Arch::Sm90a {
        println!("skipped: the fused prefill is sm_90a only ({:?})", rt.arch());
        return;
    }
    fused_cases(&rt, ScanTile::FusedSplitProfile);
}

fn fused_cases(rt: &Runtime, tile: ScanTile) {
    let fused = |mut c: Case| {
        c.tile = tile;
        c
    };
    for (dk, dv) in [(128, 128), (128, 256)] {
        run_prefill::<bf16>(&rt, &fused(Case::new("fused-plain", &RAGGED, 1, 2, dk, dv)));
        let mut c = fused(Case::new("fused-labels", &RAGGED, 1, 2, dk, dv));
        c.labels = Labels::Random;
        c.hr = 1;
        c.l2norm = true;
        c.seed = 41;
        run_prefill::<bf16>(&rt, &c);
        run_prefill::<f16>(&rt, &c);
    }
    // GVA 4 (fused_prep serves four value heads per q/k head), ragged, labels, l2norm.
    for (dv, cp) in [(128, ScanParallel::Off), (256, ScanParallel::Segments(2))] {
        let mut c = fused(Case::new("fused-gva4", &[1, 63, 64, 65, 127, 129, 700], 1, 4, 128, dv));
        c.labels = Labels::Random;
        c.hr = 2;
        c.l2norm = true;
        c.seed = 29;
        c.cp = cp;
        run_prefill::<bf16>(&rt, &c);
        c.beta_f32 = false;
        run_prefill::<f16>(&rt, &c);
    }
    // GVA, f16 with beta in the activation dtype; all-ATTN labels (pure decays).
    let mut c = fused(Case::new("fused-gva-f16", &RAGGED, 2, 4, 128, 128));
    c.labels = Labels::Random;
    c.hr = 2;
    c.beta_f32 = false;
    run_prefill::<f16>(&rt, &c);
    c.labels = Labels::AllAttn;
    run_prefill::<bf16>(&rt, &c);
    for labels in [Labels::AllGdn, Labels::Random] {
        let mut c = fused(Case::new("fused-gva-labels", &RAGGED, 2, 4, 128, 128));
        c.labels = labels;
        c.hr = 2;
        c.l2norm = true;
        c.seed = 7;
        run_prefill::<bf16>(&rt, &c);
    }
    // Many heads (several CTAs per SM's worth of work, GVA 2).
    for (dv, hv) in [(128, 16), (256, 12)] {
        let mut c = fused(Case::new("fused-heads", &RAGGED, hv / 2, hv, 128, dv));
        c.labels = Labels::Random;
        c.hr = hv / 2;
        c.l2norm = true;
        c.seed = 43;
        run_prefill::<bf16>(&rt, &c);
    }
    // The NAtS-L shape: packed strided q / k / v views (TMA maps over the packed rows), no h0.
    let mut c = fused(Case::new("fused-natsl", &[300, 640, 37], 2, 2, 128, 256));
    c.labels = Labels::Random;
    c.hr = 2;
    c.h0 = false;
    c.packed = true;
    c.l2norm = true;
    run_prefill::<bf16>(&rt, &c);
    run_prefill::<f16>(&rt, &c);
    // Context parallelism: pass A (offset and identity tiles), cp_combine, pass C.
    for segs in [2, 3, 7, 16] {
        let mut c = fused(Case::new("fused-cp-single", &[1000], 1, 2, 128, 128));
        c.labels = Labels::Random;
        c.hr = 1;
        c.seed = 11 + segs as u64;
        c.cp = ScanParallel::Segments(segs);
        run_prefill::<bf16>(&rt, &c);
    }
    for (dk, dv) in [(128, 128), (128, 256)] {
        let mut c = fused(Case::new("fused-cp-ragged", &[1, 63, 64, 65, 200, 1000, 640], 1, 2, dk, dv));
        c.labels = Labels::Random;
        c.hr = 1;
        c.l2norm = true;
        c.seed = 23;
        c.cp = ScanParallel::Segments(4);
        run_prefill::<bf16>(&rt, &c);
    }
    let mut c = fused(Case::new("fused-cp-f16", &RAGGED, 2, 4, 128, 128));
    c.labels = Labels::Random;
    c.hr = 2;
    c.beta_f32 = false;
    c.cp = ScanParallel::Segments(3);
    run_prefill::<f16>(&rt, &c);
    c.labels = Labels::AllAttn;
    c.cp = ScanParallel::Segments(5);
    run_prefill::<bf16>(&rt, &c);
    c.labels = Labels::None;
    c.h0 = false;
    c.cp = ScanParallel::Segments(8);
    run_prefill::<bf16>(&rt, &c);
    // Long sequences with long memory (errors would accumulate through the state).
    let mut c = fused(Case::new("fused-long", &[16384], 1, 2, 128, 128));
    c.l2norm = true;
    c.g_lo = -0.02;
    run_prefill::<bf16>(&rt, &c);
    for cp in [ScanParallel::Segments(8), ScanParallel::Auto] {
        c.cp = cp;
        run_prefill::<bf16>(&rt, &c);
    }
    let mut c = fused(Case::new("fused-long-65536", &[65536], 1, 1, 128, 128));
    c.l2norm = true;
    c.g_lo = -0.02;
    run_prefill::<bf16>(&rt, &c);
    c.labels = Labels::Random;
    c.hr = 1;
    c.l2norm = false;
    run_prefill::<f16>(&rt, &c);
}

/// A small cut of `prefill_fused_tile` for compute-sanitizer (memcheck, racecheck): ragged,
/// random labels, l2norm, h0 at both dims pairs, and context parallelism in 3 segments.
#[test]
fn prefill_fused_small() {
    let Some(rt) = testing::gpu_or_skip("prefill_fused_small") else {
        return;
    };
    if rt.arch() != Arch::Sm90a {
        println!("skipped: the fused prefill is sm_90a only ({:?})", rt.arch());
        return;
    }
    fused_small_cases(&rt, ScanTile::Fused);
}

fn fused_small_cases(rt: &Runtime, tile: ScanTile) {
    for (dk, dv) in [(128, 128), (128, 256)] {
        let mut c = Case::new("fused-small", &[1, 63, 64, 65, 200], 1, 2, dk, dv);
        c.tile = tile;
        c.labels = Labels::Random;
        c.hr = 1;
        c.l2norm = true;
        c.seed = 5;
        run_prefill::<bf16>(rt, &c);
        c.cp = ScanParallel::Segments(3);
        run_prefill::<bf16>(rt, &c);
    }
}

/// The error of a forced fused call (`tile`) at (dk, dv) on `rt` (one sequence, one head).
fn fused_call_error(rt: &Runtime, cu: &[i32], dk: usize, dv: usize, tile: ScanTile) -> natsl::Error {
    let t = *cu.last().unwrap() as usize;
    let batch = Batch::new(rt, cu).unwrap();
    let q = testing::upload::<bf16>(rt, &vec![0.1; t * dk]).unwrap();
    let k = testing::upload::<bf16>(rt, &vec![0.1; t * dk]).unwrap();
    let v = testing::upload::<bf16>(rt, &vec![0.1; t * dv]).unwrap();
    let g = testing::upload::<f32>(rt, &vec![-0.01; t]).unwrap();
    let beta = testing::upload::<f32>(rt, &vec![0.5; t]).unwrap();
    let mut o = testing::poisoned::<bf16>(rt, t * dv).unwrap();
    let inp = GdnPrefillInputs {
        q: TensorRef::new(&q, &[t, 1, dk]),
        k: TensorRef::new(&k, &[t, 1, dk]),
        v: TensorRef::new(&v, &[t, 1, dv]),
        g: TensorRef::new(&g, &[t, 1]),
        beta: TensorRef::new(&beta, &[t, 1]),
        labels: None,
        h0: None,
    };
    let mut out = GdnPrefillOutputs { o: TensorMut::new(&mut o, &[t, 1, dv]), committed: None, running: None, gsum_running: None };
    let v = PrefillVariant { tile, ..Default::default() };
    gdn_prefill_variant(rt, &batch, &inp, &mut out, &GdnOptions::default(), &mut GdnWorkspace::new(), v).unwrap_err()
}

#[test]
fn prefill_f16_and_bf16_gva_labels_l2norm() {
    for_arches("prefill_f16_and_bf16_gva_labels_l2norm", |rt| {
        for labels in [Labels::AllGdn, Labels::AllAttn, Labels::Random] {
            let mut c = Case::new("gva-labels", &RAGGED, 2, 4, 128, 128);
            c.labels = labels;
            c.hr = 2;
            c.l2norm = true;
            c.seed = 7;
            for tile in [ScanTile::Wide, ScanTile::Reg] {
                c.tile = tile;
                run_prefill::<bf16>(rt, &c);
            }
            c.tile = ScanTile::Auto;
            c.l2norm = false;
            c.beta_f32 = false;
            run_prefill::<f16>(rt, &c);
        }
    });
}

#[test]
fn prefill_natsl_shapes_random_labels_no_h0_packed() {
    let Some(rt) = testing::gpu_or_skip("prefill_natsl_shapes_random_labels_no_h0_packed") else {
        return;
    };
    for (dk, dv) in [(128, 256), (192, 384)] {
        let mut c = Case::new("natsl", &[300, 640, 37], 2, 2, dk, dv);
        c.labels = Labels::Random;
        c.hr = 2;
        c.h0 = false;
        c.packed = true;
        c.l2norm = true;
        run_prefill::<bf16>(&rt, &c);
        run_prefill::<f16>(&rt, &c);
    }
}

#[test]
fn prefill_long_sequence_65536() {
    let Some(rt) = testing::gpu_or_skip("prefill_long_sequence_65536") else {
        return;
    };
    let mut c = Case::new("long", &[65536], 1, 1, 128, 128);
    c.l2norm = true;
    c.g_lo = -0.02; // long memory: state errors would accumulate
    run_prefill::<bf16>(&rt, &c);
    c.labels = Labels::Random;
    c.hr = 1;
    c.l2norm = false;
    run_prefill::<f16>(&rt, &c);
}

// ------------------------------------------- context-parallel scan (ScanParallel)

/// One sequence of 1000 tokens (15 full chunks + 40 tokens) split into 2, 3, 4, 7 and
/// 16 segments (16 > chunks: one chunk per segment), random labels incl. ATTN chunks,
/// h0, committed / running / gsum checked; both tiles.
#[test]
fn prefill_cp_segments_single_sequence() {
    for_arches("prefill_cp_segments_single_sequence", |rt| {
        for segs in [2, 3, 4, 7, 16] {
            let mut c = Case::new("cp-single", &[1000], 1, 2, 128, 128);
            c.labels = Labels::Random;
            c.hr = 1;
            c.seed = 11 + segs as u64;
            c.cp = ScanParallel::Segments(segs);
            for tile in [ScanTile::Wide, ScanTile::Reg] {
                c.tile = tile;
                run_prefill::<bf16>(rt, &c);
            }
        }
    });
}

/// Ragged batch (sequences of 1..1000 tokens: some shorter than the segment count,
/// some ending on a chunk boundary) with 4 segments, every head-dim pair, GVA,
/// random labels, l2norm, h0.
#[test]
fn prefill_cp_segments_ragged_every_head_dim_pair() {
    for_arches("prefill_cp_segments_ragged_every_head_dim_pair", |rt| {
        for (dk, dv) in [(64, 64), (128, 128), (256, 256), (128, 256), (192, 384)] {
            let mut c = Case::new("cp-ragged", &[1, 63, 64, 65, 200, 1000, 640], 1, 2, dk, dv);
            c.labels = Labels::Random;
            c.hr = 1;
            c.l2norm = true;
            c.seed = 23;
            c.cp = ScanParallel::Segments(4);
            run_prefill::<bf16>(rt, &c);
        }
        let mut c = Case::new("cp-ragged-f16", &RAGGED, 2, 4, 128, 128);
        c.labels = Labels::Random;
        c.hr = 2;
        c.beta_f32 = false;
        c.cp = ScanParallel::Segments(3);
        run_prefill::<f16>(rt, &c);
        // All-ATTN chunks: the transitions are pure decays.
        c.labels = Labels::AllAttn;
        c.cp = ScanParallel::Segments(5);
        run_prefill::<bf16>(rt, &c);
        // No labels, no h0.
        c.labels = Labels::None;
        c.h0 = false;
        c.cp = ScanParallel::Segments(8);
        run_prefill::<bf16>(rt, &c);
    });
}

/// A long sequence with long memory (state errors would accumulate through the
/// segment chain): 16384 tokens in 8 and 32 segments, and the Auto choice.
#[test]
fn prefill_cp_long_sequence() {
    let Some(rt) = testing::gpu_or_skip("prefill_cp_long_sequence") else {
        return;
    };
    let mut c = Case::new("cp-long", &[16384], 1, 2, 128, 128);
    c.l2norm = true;
    c.g_lo = -0.02;
    for cp in [ScanParallel::Segments(8), ScanParallel::Segments(32), ScanParallel::Auto] {
        c.cp = cp;
        run_prefill::<bf16>(&rt, &c);
    }
    c.labels = Labels::Random;
    c.l2norm = false;
    c.cp = ScanParallel::Segments(8);
    run_prefill::<f16>(&rt, &c);
}

// ---------------------------------------------------------------- decode

#[derive(Clone)]
struct DecodeCase {
    name: &'static str,
    /// Tokens already seen per sequence (positions inside their chunks differ).
    pos: Vec<i32>,
    tokens_per_seq: usize,
    steps: usize,
    hqk: usize,
    hv: usize,
    hr: usize,
    dk: usize,
    dv: usize,
    commit: bool,
    l2norm: bool,
    seed: u64,
    /// A forced state tile (`gdn_decode_variant`); None = the catalog's.
    tile: Option<natsl_codegen::spec::Tile>,
    /// (sequence, index value): the sequence's running (and committed) index replaced by
    /// -1 (a padded slot) or a bad row: skipped whole, recorded as a fault unless -1.
    skip: Vec<(usize, i32)>,
    /// Labels of GDN chunks sent as 7 (read as GDN, recorded as a fault at a commit).
    bad_labels: bool,
}

fn run_decode<T: TestElem + Element>(rt: &Runtime, c: &DecodeCase) {
    println!(
        "decode case {} ({:?}, {}): pos {:?}, J {}, steps {}, heads {}/{}, d {}/{}, commit {}",
        c.name,
        rt.arch(),
        std::any::type_name::<T>(),
        c.pos,
        c.tokens_per_seq,
        c.steps,
        c.hqk,
        c.hv,
        c.dk,
        c.dv,
        c.commit
    );
    let n = c.pos.len();
    let j = c.tokens_per_seq;
    let rows = n * j;
    let (hqk, hv, dk, dv) = (c.hqk, c.hv, c.dk, c.dv);
    let sd = hv * dk * dv;
    let hsd = dk * dv;
    let mut rng = testing::rng(c.seed);
    let pool_rows = n + 3;
    let ridx: Vec<i32> = (0..n).map(|s| ((s * 5 + 2) % pool_rows) as i32).collect();
    let cidx: Vec<i32> = (0..n).map(|s| ((s * 7 + 1) % pool_rows) as i32).collect();
    // Host cache (per sequence): running, committed, gsum, pos.
    let mut running = testing::quantize::<f32>(&testing::rand_vec(&mut rng, n * sd, 0.3));
    let mut committed = testing::quantize::<f32>(&testing::rand_vec(&mut rng, n * sd, 0.3));
    let mut gsum = testing::quantize::<f32>(&testing::rand_range(&mut rng, n * hv, -1.0, 0.0));
    for s in 0..n {
        if c.pos[s] % 64 == 0 {
            // At a chunk start the running state is the committed one and gsum is 0.
            let (a, b) = (s * sd, (s + 1) * sd);
            let cs = committed[a..b].to_vec();
            running[a..b].copy_from_slice(&cs);
            gsum[s * hv..(s + 1) * hv].iter_mut().for_each(|x| *x = 0.0);
        }
    }
    let mut pos = c.pos.clone();
    let scatter = |v: &[f64], idx: &[i32]| {
        let mut p = vec![0.0; pool_rows * sd];
        for s in 0..n {
            let r = idx[s] as usize;
            p[r * sd..(r + 1) * sd].copy_from_slice(&v[s * sd..(s + 1) * sd]);
        }
        p
    };
    let mut rund = testing::upload::<f32>(rt, &scatter(&running, &ridx)).unwrap();
    let mut comd = testing::upload::<f32>(rt, &scatter(&committed, &cidx)).unwrap();
    let mut gsd = testing::upload::<f32>(rt, &gsum).unwrap();
    let mut posd = rt.stream().clone_htod(&pos).unwrap();
    let skipped = |s: usize| c.skip.iter().any(|&(q, _)| q == s);
    let with_skips = |idx: &[i32]| -> Vec<i32> {
        let mut v = idx.to_vec();
        for &(s, bad) in &c.skip {
            v[s] = bad;
        }
        v
    };
    let ridxd = rt.stream().clone_htod(&with_skips(&ridx)).unwrap();
    let cidxd = rt.stream().clone_htod(&with_skips(&cidx)).unwrap();
    rt.device_faults().unwrap(); // start from a clear fault word
    let mut want_faults = 0u32;
    if c.skip.iter().any(|&(_, bad)| bad != -1) {
        want_faults |= natsl::params::NATSL_FAULT_POOL_INDEX;
    }
    let mut ws = GdnDecodeWorkspace::new();
    let tol = testing::tolerance(T::DTYPE);
    let mut rep = Report::default();

    for step in 0..c.steps {
        let qk_scale = if c.l2norm {
            1.0
        } else {
            (3.0 / dk as f64).sqrt()
        };
        let q = testing::quantize::<T>(&testing::rand_vec(&mut rng, rows * hqk * dk, qk_scale));
        let k = testing::quantize::<T>(&testing::rand_vec(&mut rng, rows * hqk * dk, qk_scale));
        let v = testing::quantize::<T>(&testing::rand_vec(&mut rng, rows * hv * dv, 1.0));
        let g = testing::quantize::<f32>(&testing::rand_range(&mut rng, rows * hv, -0.1, -1e-4));
        let beta = testing::quantize::<T>(&testing::rand_range(&mut rng, rows * hv, 0.05, 0.95));
        let labels: Vec<u8> = (0..n * c.hr)
            .map(|_| {
                if rng.gen_bool(0.5) {
                    LABEL_ATTN
                } else {
                    LABEL_GDN
                }
            })
            .collect();

        // Reference: the GDN part of reference::decode_step (hybrid.rs), token by token.
        let mut o_ref = vec![0.0; rows * hv * dv];
        for s in 0..n {
            if skipped(s) {
                continue; // o rows stay zero; state, gsum and pos untouched
            }
            for jj in 0..j {
                let r = s * j + jj;
                for h in 0..hv {
                    let hq = h / (hv / hqk);
                    let st = &mut running[s * sd + h * hsd..s * sd + (h + 1) * hsd];
                    let o = gdn_decode_step(
                        st,
                        &q[(r * hqk + hq) * dk..(r * hqk + hq + 1) * dk],
                        &k[(r * hqk + hq) * dk..(r * hqk + hq + 1) * dk],
                        &v[(r * hv + h) * dv..(r * hv + h + 1) * dv],
                        g[r * hv + h],
                        beta[r * hv + h],
                        None,
                        c.l2norm,
                    );
                    o_ref[(r * hv + h) * dv..(r * hv + h + 1) * dv].copy_from_slice(&o);
                    gsum[s * hv + h] += g[r * hv + h];
                }
                pos[s] += 1;
                if c.commit && pos[s] % 64 == 0 {
                    for h in 0..hv {
                        let lab = labels[s * c.hr + h / (hv / c.hr)];
                        if c.bad_labels && lab == LABEL_GDN {
                            want_faults |= natsl::params::NATSL_FAULT_LABEL;
                        }
                        let rg = s * sd + h * hsd..s * sd + (h + 1) * hsd;
                        if lab == LABEL_ATTN {
                            let d = gsum[s * hv + h].exp();
                            committed[rg.clone()].iter_mut().for_each(|x| *x *= d);
                        } else {
                            let rs = running[rg.clone()].to_vec();
                            committed[rg.clone()].copy_from_slice(&rs);
                        }
                        let cs = committed[rg.clone()].to_vec();
                        running[rg].copy_from_slice(&cs);
                        gsum[s * hv + h] = 0.0;
                    }
                } else if pos[s] % 64 == 0 {
                    gsum[s * hv..(s + 1) * hv].iter_mut().for_each(|x| *x = 0.0);
                }
            }
        }

        let qd = testing::upload::<T>(rt, &q).unwrap();
        let kd = testing::upload::<T>(rt, &k).unwrap();
        let vd = testing::upload::<T>(rt, &v).unwrap();
        let gd = testing::upload::<f32>(rt, &g).unwrap();
        let bd = testing::upload::<T>(rt, &beta).unwrap();
        let sent: Vec<u8> = labels.iter().map(|&l| if c.bad_labels && l == LABEL_GDN { 7 } else { l }).collect();
        let ld = rt.stream().clone_htod(&sent).unwrap();
        let mut od = testing::poisoned::<T>(rt, rows * hv * dv).unwrap();
        {
            let inp = GdnDecodeInputs {
                q: TensorRef::new(&qd, &[rows, hqk, dk]),
                k: TensorRef::new(&kd, &[rows, hqk, dk]),
                v: TensorRef::new(&vd, &[rows, hv, dv]),
                g: TensorRef::new(&gd, &[rows, hv]),
                beta: TensorRef::new(&bd, &[rows, hv]),
                labels: c.commit.then(|| TensorRef::new(&ld, &[n, c.hr])),
                tokens_per_seq: j,
            };
            let mut o = TensorMut::new(&mut od, &[rows, hv, dv]);
            let mut st = GdnDecodeState {
                running: TensorMut::new(&mut rund, &[pool_rows, hv, dk, dv]),
                running_index: TensorRef::new(&ridxd, &[n]),
                committed: if c.commit {
                    Some((
                        TensorMut::new(&mut comd, &[pool_rows, hv, dk, dv]),
                        TensorRef::new(&cidxd, &[n]),
                    ))
                } else {
                    None
                },
                gsum: Some(TensorMut::new(&mut gsd, &[n, hv])),
                pos: Some(TensorMut::new(&mut posd, &[n])),
            };
            gdn_decode_variant(
                rt,
                &inp,
                &mut o,
                &mut st,
                &GdnOptions {
                    scale: None,
                    l2norm: c.l2norm,
                },
                &mut ws,
                c.tile,
            )
            .unwrap();
        }
        rt.synchronize().unwrap();
        let o = testing::download(rt, &od).unwrap();
        rep.check(&format!("step {step} o"), &o, &o_ref, hv, dv, tol);
    }
    let gather = |p: &[f64], idx: &[i32]| -> Vec<f64> {
        (0..n)
            .flat_map(|s| p[idx[s] as usize * sd..(idx[s] as usize + 1) * sd].to_vec())
            .collect()
    };
    let run_d = gather(&testing::download(rt, &rund).unwrap(), &ridx);
    rep.check("running state", &run_d, &running, hv, hsd, tol);
    if c.commit {
        let com_d = gather(&testing::download(rt, &comd).unwrap(), &cidx);
        rep.check("committed state", &com_d, &committed, hv, hsd, tol);
    }
    let gs_d = testing::download(rt, &gsd).unwrap();
    let gerr = gs_d
        .iter()
        .zip(&gsum)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!("  gsum max abs err {gerr:.3e}");
    if gerr.is_nan() || gerr > 1e-4 {
        rep.failures.push(format!("gsum: max abs err {gerr:.3e}"));
    }
    let pos_d: Vec<i32> = rt.stream().clone_dtoh(&posd).unwrap();
    println!("  pos {pos_d:?} (want {pos:?})");
    if pos_d != pos {
        rep.failures
            .push(format!("pos: got {pos_d:?}, want {pos:?}"));
    }
    let faults = rt.device_faults().unwrap();
    println!("  device faults: {faults} (want {:?})", natsl::DeviceFaults(want_faults));
    if faults.0 != want_faults {
        rep.failures.push(format!("device faults: got {faults:?}, want {want_faults:#x}"));
    }
    rep.finish(c.name);
}

#[test]
fn decode_single_token_with_commit_across_positions() {
    for_arches("decode_single_token_with_commit_across_positions", |rt| {
        let c = DecodeCase {
            name: "j1",
            pos: vec![0, 5, 62, 63, 64, 127, 200, 1023],
            tokens_per_seq: 1,
            steps: 3,
            hqk: 2,
            hv: 4,
            hr: 2,
            dk: 128,
            dv: 128,
            commit: true,
            l2norm: true,
            seed: 3,
            tile: None,
            skip: vec![],
            bad_labels: false,
        };
        run_decode::<bf16>(rt, &c);
        run_decode::<f16>(rt, &DecodeCase { l2norm: false, ..c });
    });
}

#[test]
fn decode_speculative_tokens_cross_a_chunk_boundary() {
    let Some(rt) = testing::gpu_or_skip("decode_speculative_tokens_cross_a_chunk_boundary") else {
        return;
    };
    for (dk, dv) in [(64, 64), (128, 128), (256, 256), (128, 256), (192, 384)] {
        let c = DecodeCase {
            name: "spec",
            pos: vec![60, 61, 3, 127, 64],
            tokens_per_seq: 3,
            steps: 2,
            hqk: 1,
            hv: 2,
            hr: 1,
            dk,
            dv,
            commit: true,
            l2norm: true,
            seed: 11,
            tile: None,
            skip: vec![],
            bad_labels: false,
        };
        run_decode::<bf16>(&rt, &c);
    }
    let c = DecodeCase {
        name: "spec8",
        pos: vec![57, 120, 0],
        tokens_per_seq: 8,
        steps: 2,
        hqk: 2,
        hv: 4,
        hr: 4,
        dk: 128,
        dv: 128,
        commit: true,
        l2norm: false,
        seed: 12,
        tile: None,
        skip: vec![],
        bad_labels: false,
    };
    run_decode::<f16>(&rt, &c);
}

#[test]
fn decode_padded_and_bad_slots_are_skipped_and_recorded() {
    // Engines capture decode graphs at a padded batch size with index -1 in the padded
    // slots: those are skipped silently; any other out-of-range row is skipped the same
    // way and recorded; a label outside 0..=2 reads as GDN and is recorded.
    let Some(rt) = testing::gpu_or_skip("decode_padded_and_bad_slots_are_skipped_and_recorded") else {
        return;
    };
    let base = DecodeCase {
        name: "padded",
        pos: vec![63, 10, 127, 64, 191, 5],
        tokens_per_seq: 2,
        steps: 2,
        hqk: 2,
        hv: 4,
        hr: 2,
        dk: 128,
        dv: 128,
        commit: true,
        l2norm: true,
        seed: 21,
        tile: None,
        skip: vec![(1, -1), (4, -1)],
        bad_labels: false,
    };
    run_decode::<bf16>(&rt, &base);
    run_decode::<bf16>(&rt, &DecodeCase { name: "bad rows", skip: vec![(0, 1 << 20), (3, -7), (5, -1)], ..base.clone() });
    run_decode::<f16>(&rt, &DecodeCase { name: "bad labels", skip: vec![], bad_labels: true, ..base });
}

#[test]
fn decode_plain_gdn_without_commit() {
    let Some(rt) = testing::gpu_or_skip("decode_plain_gdn_without_commit") else {
        return;
    };
    let c = DecodeCase {
        name: "plain",
        pos: vec![10, 63, 64, 300],
        tokens_per_seq: 2,
        steps: 3,
        hqk: 2,
        hv: 8,
        hr: 2,
        dk: 128,
        dv: 128,
        commit: false,
        l2norm: true,
        seed: 5,
        tile: None,
        skip: vec![],
        bad_labels: false,
    };
    run_decode::<bf16>(&rt, &c);
}

#[test]
fn decode_state_tiles() {
    // Every state tile the bench compares, with commit and speculative tokens.
    use natsl_codegen::spec::Tile;
    let Some(rt) = testing::gpu_or_skip("decode_state_tiles") else {
        return;
    };
    for tile in [Tile::new(1, 32, 4, 1), Tile::new(1, 64, 8, 1), Tile::new(1, 32, 8, 1), Tile::new(1, 16, 2, 1)] {
        for (dk, dv) in [(128, 128), (64, 64), (128, 256)] {
            let c = DecodeCase {
                name: "tile",
                pos: vec![60, 61, 3, 127, 64],
                tokens_per_seq: 3,
                steps: 2,
                hqk: 1,
                hv: 2,
                hr: 1,
                dk,
                dv,
                commit: true,
                l2norm: true,
                seed: 17,
                tile: Some(tile),
                skip: vec![],
                bad_labels: false,
            };
            run_decode::<bf16>(&rt, &c);
        }
    }
}
