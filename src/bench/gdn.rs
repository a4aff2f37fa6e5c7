//! GDN prefill and decode timings (BENCH.md shapes P1..P9, the NAtS-L shapes, decode
//! batches), used by `cargo bench --bench gdn` and `natsl bench gdn`. Panics on a
//! device error (a benchmark tool, not API).

use half::bf16;
use super::{fill, time_it, Record};
use crate::ops::gdn::*;
use crate::{testing, Batch, Runtime, TensorMut, TensorRef};
use rand::{Rng, SeedableRng};

const CHUNK: usize = 64;


struct Prefill {
    name: String,
    lens: Vec<usize>,
    hqk: usize,
    hv: usize,
    dk: usize,
    dv: usize,
    attn_frac: Option<f64>,
    /// A point of a length sweep: the default path only (the PNG's series).
    sweep: bool,
}

fn flops_prefill(t: usize, hv: usize, dk: usize, dv: usize) -> f64 {
    (t * hv) as f64 * (6.0 * (dk * dv) as f64 + 4.0 * CHUNK as f64 * (dk + dv) as f64)
}

/// The full prefill, then (`split`) prep alone and scan alone (the scan reads the
/// workspace the full call left), then (`cp`) the context-parallel scan
/// ([`ScanParallel`]): full prefill and scan alone per segment count.
/// `NATSL_BENCH_FUSED_ONLY=1`: the default and the fused candidate's rows only (a short
/// run beside the FlashQLA / fla peers in one device call).
fn bench_prefill(rt: &Runtime, s: &Prefill, split: bool, cp: bool) -> Vec<Record> {
    let fused_only = std::env::var_os("NATSL_BENCH_FUSED_ONLY").is_some();
    let split = split && !fused_only;
    let cu = testing::cu_seqlens(&s.lens);
    let t = *cu.last().unwrap() as usize;
    let n = s.lens.len();
    let (hqk, hv, dk, dv) = (s.hqk, s.hv, s.dk, s.dv);
    let batch = Batch::new(rt, &cu).unwrap();
    let q = fill::<bf16>(rt, t * hqk * dk, -1.0, 1.0, 1);
    let k = fill::<bf16>(rt, t * hqk * dk, -1.0, 1.0, 2);
    let v = fill::<bf16>(rt, t * hv * dv, -1.0, 1.0, 3);
    let g = fill::<f32>(rt, t * hv, -0.1, -0.001, 4);
    let beta = fill::<f32>(rt, t * hv, 0.05, 0.95, 5);
    let h0 = fill::<f32>(rt, n * hv * dk * dv, -0.5, 0.5, 6);
    let ns = crate::batch::num_slots(t, n);
    let labels: Option<cudarc::driver::CudaSlice<u8>> = s.attn_frac.map(|f| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let l: Vec<u8> = (0..ns * hv).map(|_| rng.gen_bool(f) as u8).collect();
        rt.stream().clone_htod(&l).unwrap()
    });
    let mut o = rt.stream().alloc_zeros::<bf16>(t * hv * dv).unwrap();
    let mut st = rt.stream().alloc_zeros::<f32>(n * hv * dk * dv).unwrap();
    let mut ws = GdnWorkspace::new();
    let inp = GdnPrefillInputs {
        q: TensorRef::new(&q, &[t, hqk, dk]),
        k: TensorRef::new(&k, &[t, hqk, dk]),
        v: TensorRef::new(&v, &[t, hv, dv]),
        g: TensorRef::new(&g, &[t, hv]),
        beta: TensorRef::new(&beta, &[t, hv]),
        labels: labels.as_ref().map(|l| TensorRef::new(l, &[ns, hv])),
        h0: Some(PoolIn {
            pool: TensorRef::new(&h0, &[n, hv, dk, dv]),
            index: None,
        }),
    };
    let mut out = GdnPrefillOutputs {
        o: TensorMut::new(&mut o, &[t, hv, dv]),
        committed: Some(PoolOut {
            pool: TensorMut::new(&mut st, &[n, hv, dk, dv]),
            index: None,
        }),
        running: None,
        gsum_running: None,
    };
    let opts = GdnOptions {
        scale: None,
        l2norm: true,
    };
    // NATSL_BENCH_FUSED_PROFILE=1: the fused prefill's phase-timer build only.
    if std::env::var_os("NATSL_BENCH_FUSED_PROFILE").is_some() {
        if fused_supported(dk, dv, rt.arch()) {
            fused_profile(rt, &s.name, &batch, &inp, &mut out, &opts, &mut ws, dv);
        }
        return Vec::new();
    }
    let timing = time_it(rt, 3, 10, |_| {
        gdn_prefill(rt, &batch, &inp, &mut out, &opts, &mut ws)
    })
    .unwrap();
    let flops = flops_prefill(t, hv, dk, dv);
    let bytes =
        (2 * t * hqk * dk * 2 + t * hv * dv * 2 * 2 + t * hv * 8 + 2 * n * hv * dk * dv * 4) as f64;
    let variant = match s.attn_frac {
        Some(f) => format!("bf16 attn{:.2}", f),
        None => "bf16".into(),
    };
    let mut recs = vec![Record::new(
        rt,
        "gdn_prefill",
        s.name.clone(),
        variant.clone(),
        &timing,
        flops,
        bytes,
    )];
    if s.sweep {
        return recs;
    }
    if split {
        for (part, tag) in [
            (PrefillPart::Scan, "scan"),
            (PrefillPart::Prep, "prep grouped"),
            // (The removed substitution / blocked / compact preps and Staged / Full scan
            // tiles, runs d, f, i (bench/NOTES.md), were slower everywhere; their rows are gone.)
            // The register-state scan (ScanTile::Reg, scan_reg n32w4, dk 128 only). (Its
            // n128w8 / n64w8 tiles, rows `scan reg` at many CTAs and `scan reg n64w8`, were
            // removed after run i; `scan reg n32w4` is now `scan reg`.)
            (PrefillPart::Scan, "scan reg"),
        ] {
            if tag == "scan reg" && dk != 128 {
                continue;
            }
            let tile = if tag == "scan reg" { ScanTile::Reg } else { ScanTile::Auto };
            let tm = time_it(rt, 3, 10, |_| {
                gdn_prefill_variant(rt, &batch, &inp, &mut out, &opts, &mut ws, PrefillVariant { tile, part: Some(part), ..Default::default() })
            })
            .unwrap();
            recs.push(Record::new(
                rt,
                "gdn_prefill",
                s.name.clone(),
                format!("{variant} {tag} only"),
                &tm,
                flops,
                bytes,
            ));
        }
    }
    // Candidate defaults, end to end (prep + scan, context parallelism Auto), and the fused
    // sm_90a prefill (ScanTile::Fused: fused_prep, then the fused kernel; Auto's pick where
    // it has a kernel) with its own context-parallel choice (Auto) and without (off).
    let fused = fused_supported(dk, dv, rt.arch());
    let mut cands = vec![(ScanTile::Auto, ScanParallel::Auto, "grouped")];
    if dk == 128 {
        cands.push((ScanTile::Reg, ScanParallel::Auto, "grouped+reg"));
    }
    if fused_only {
        cands.clear();
    }
    if fused {
        cands.push((ScanTile::Fused, ScanParallel::Auto, "fused"));
        cands.push((ScanTile::Fused, ScanParallel::Off, "fused cp off"));
    }
    for (tile, cp, tag) in cands {
        let tm = time_it(rt, 3, 10, |_| gdn_prefill_variant(rt, &batch, &inp, &mut out, &opts, &mut ws, PrefillVariant { tile, cp, ..Default::default() })).unwrap();
        recs.push(Record::new(rt, "gdn_prefill", s.name.clone(), format!("{variant} {tag}"), &tm, flops, bytes));
    }
    // The fused prefill's halves (cp off): fused_prep alone, the fused kernel alone
    // (reading the records the rows above left).
    if fused {
        for (part, tag) in [(PrefillPart::Prep, "fused prep only"), (PrefillPart::Scan, "fused scan only")] {
            let v = PrefillVariant { tile: ScanTile::Fused, cp: ScanParallel::Off, part: Some(part) };
            let tm = time_it(rt, 3, 10, |_| gdn_prefill_variant(rt, &batch, &inp, &mut out, &opts, &mut ws, v)).unwrap();
            recs.push(Record::new(rt, "gdn_prefill", s.name.clone(), format!("{variant} {tag}"), &tm, flops, bytes));
        }
    }
    if cp {
        let mut rows = vec![
            (ScanParallel::Auto, "cp auto".to_string(), ScanTile::Auto),
            (ScanParallel::Segments(4), "cp4".into(), ScanTile::Auto),
            (ScanParallel::Segments(8), "cp8".into(), ScanTile::Auto),
            (ScanParallel::Segments(16), "cp16".into(), ScanTile::Auto),
            // The register-state scan under context parallelism (ScanTile::Reg).
            (ScanParallel::Auto, "reg cp auto".to_string(), ScanTile::Reg),
            (ScanParallel::Segments(8), "reg cp8".into(), ScanTile::Reg),
            (ScanParallel::Segments(16), "reg cp16".into(), ScanTile::Reg),
        ];
        if fused_only {
            rows.clear();
        }
        if dk != 128 {
            rows.retain(|r| r.2 != ScanTile::Reg);
        }
        if fused {
            // The fused prefill's three cp passes ("scan only": without fused_prep).
            for k in [2, 4, 8, 16] {
                rows.push((ScanParallel::Segments(k), format!("fused cp{k}"), ScanTile::Fused));
            }
        }
        for (sp, tag, tile) in rows {
            let full = time_it(rt, 3, 10, |_| {
                gdn_prefill_variant(rt, &batch, &inp, &mut out, &opts, &mut ws, PrefillVariant { cp: sp, tile, ..Default::default() })
            })
            .unwrap();
            recs.push(Record::new(
                rt,
                "gdn_prefill",
                s.name.clone(),
                format!("{variant} {tag}"),
                &full,
                flops,
                bytes,
            ));
            let scan = time_it(rt, 3, 10, |_| {
                gdn_prefill_variant(rt, &batch, &inp, &mut out, &opts, &mut ws, PrefillVariant { cp: sp, tile, part: Some(PrefillPart::Scan) })
            })
            .unwrap();
            recs.push(Record::new(
                rt,
                "gdn_prefill",
                s.name.clone(),
                format!("{variant} {tag} scan only"),
                &scan,
                flops,
                bytes,
            ));
        }
    }
    recs
}

fn bench_decode(rt: &Runtime, b: usize, hqk: usize, hv: usize, d: usize, commit: bool, tile: Option<natsl_codegen::spec::Tile>) -> Record {
    let (dk, dv) = (d, d);
    let q = fill::<bf16>(rt, b * hqk * dk, -1.0, 1.0, 1);
    let k = fill::<bf16>(rt, b * hqk * dk, -1.0, 1.0, 2);
    let v = fill::<bf16>(rt, b * hv * dv, -1.0, 1.0, 3);
    let g = fill::<f32>(rt, b * hv, -0.1, -0.001, 4);
    let beta = fill::<f32>(rt, b * hv, 0.05, 0.95, 5);
    let mut run = fill::<f32>(rt, b * hv * dk * dv, -0.5, 0.5, 6);
    let mut com = fill::<f32>(rt, if commit { b * hv * dk * dv } else { 1 }, -0.5, 0.5, 7);
    let idx: Vec<i32> = (0..b as i32).collect();
    let idx_d = rt.stream().clone_htod(&idx).unwrap();
    let mut gs = rt.stream().alloc_zeros::<f32>(b * hv).unwrap();
    let mut pos = rt.stream().clone_htod(&idx).unwrap();
    let labels = rt.stream().alloc_zeros::<u8>(b * hv).unwrap();
    let mut o = rt.stream().alloc_zeros::<bf16>(b * hv * dv).unwrap();
    let mut ws = GdnDecodeWorkspace::new();
    ws.reserve(rt, b).unwrap();
    let inp = GdnDecodeInputs {
        q: TensorRef::new(&q, &[b, hqk, dk]),
        k: TensorRef::new(&k, &[b, hqk, dk]),
        v: TensorRef::new(&v, &[b, hv, dv]),
        g: TensorRef::new(&g, &[b, hv]),
        beta: TensorRef::new(&beta, &[b, hv]),
        labels: commit.then(|| TensorRef::new(&labels, &[b, hv])),
        tokens_per_seq: 1,
    };
    let mut ot = TensorMut::new(&mut o, &[b, hv, dv]);
    let mut st = GdnDecodeState {
        running: TensorMut::new(&mut run, &[b, hv, dk, dv]),
        running_index: TensorRef::new(&idx_d, &[b]),
        committed: if commit {
            Some((
                TensorMut::new(&mut com, &[b, hv, dk, dv]),
                TensorRef::new(&idx_d, &[b]),
            ))
        } else {
            None
        },
        gsum: commit.then(|| TensorMut::new(&mut gs, &[b, hv])),
        pos: commit.then(|| TensorMut::new(&mut pos, &[b])),
    };
    let opts = GdnOptions {
        scale: None,
        l2norm: true,
    };
    let timing = time_it(rt, 5, 50, |_| {
        gdn_decode_variant(rt, &inp, &mut ot, &mut st, &opts, &mut ws, tile)
    })
    .unwrap();
    let flops = (b * hv) as f64 * 6.0 * (dk * dv) as f64;
    let bytes =
        (b * hv * dk * dv * 4 * 2 + b * (2 * hqk * dk + 2 * hv * dv) * 2 + b * hv * 8) as f64;
    Record::new(
        rt,
        "gdn_decode",
        format!("B{b} h{hqk}/{hv} d{d}"),
        format!(
            "bf16{}{}",
            if commit { " commit" } else { "" },
            tile.map_or(String::new(), |t| format!(" n{}w{}", t.block_n, t.warps))
        ),
        &timing,
        flops,
        bytes,
    )
}

/// Phase names of the fused kernel's timer slots (cuda/gdn/fused.cuh NATSL_FUSED_PROF): copy
/// thread slot k ends phase k (from the latest stamped slot before k; unnamed slots are not
/// stamped), consumer slots 16 + 8 cw + e likewise.
const PREP_PHASES: [&str; 15] = [
    "(loop top)",
    "pempty wait",
    "", "", "", "", "", "", "", "", "", "", "", "",
    "TMA + record copies issued",
];
const CONS_PHASES: [&str; 7] = [
    "(loop top)",
    "pfull wait",
    "qkfull / vfull wait",
    "pack S, group 1 (+2), wait",
    "v_new frags, O scale, S decay",
    "S update + P v_new, wait",
    "pempty, O stores",
];

/// One launch of the fused prefill's phase-timer build (ScanTile::FusedSplitProfile, cp off;
/// fused_prep is not timed) and its table: median / mean cycles of each phase over chunks
/// 2..64 of the sampled CTAs (blockIdx (0, h < 4, 0)), the loop period, the copy thread ->
/// consumer hand-over.
#[allow(clippy::too_many_arguments)]
fn fused_profile(rt: &Runtime, name: &str, batch: &Batch, inp: &GdnPrefillInputs, out: &mut GdnPrefillOutputs, opts: &GdnOptions, ws: &mut GdnWorkspace, dv: usize) {
    const CTAS: usize = 4;
    const CH: usize = 64;
    const EV: usize = 32;
    let pv = PrefillVariant { tile: ScanTile::FusedSplitProfile, cp: ScanParallel::Off, ..Default::default() };
    // Twice: the first compiles and warms the caches; the third launch is recorded.
    for _ in 0..2 {
        gdn_prefill_variant(rt, batch, inp, out, opts, ws, pv).unwrap();
    }
    rt.synchronize().unwrap();
    let spec = natsl_codegen::spec::KernelSpec { tile: FUSED_PROFILE_TILE, ..fused_spec(natsl_codegen::DType::Bf16, 128, dv as u32, rt.arch()).unwrap() };
    let m = rt.module(&spec).unwrap();
    let n = CTAS * CH * EV + CTAS * 4;
    {
        let mut g = m.get_global("natsl_gdn_fused_prof", rt.stream()).unwrap();
        rt.stream().memset_zeros(&mut g).unwrap();
    }
    let t0 = std::time::Instant::now();
    gdn_prefill_variant(rt, batch, inp, out, opts, ws, pv).unwrap();
    rt.synchronize().unwrap();
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let g = m.get_global("natsl_gdn_fused_prof", rt.stream()).unwrap();
    let bytes: Vec<u8> = rt.stream().clone_dtoh(&g).unwrap();
    assert!(bytes.len() >= n * 8, "profile buffer {} bytes", bytes.len());
    let x: Vec<u64> = bytes.chunks_exact(8).take(n).map(|b| u64::from_le_bytes(b.try_into().unwrap())).collect();
    let ev = |cta: usize, c: usize, s: usize| x[(cta * CH + c) * EV + s];
    let hdr = |cta: usize, i: usize| x[CTAS * CH * EV + cta * 4 + i];
    println!("== fused profile: {name} (one launch, cp off, host wall {wall:.3} ms)");
    let mut ghz = Vec::new();
    for cta in 0..CTAS {
        let (c0, g0, c1, g1) = (hdr(cta, 0), hdr(cta, 1), hdr(cta, 2), hdr(cta, 3));
        if c1 > c0 && g1 > g0 {
            ghz.push((c1 - c0) as f64 / (g1 - g0) as f64);
            println!("   cta h{cta}: {:.3} ms, {} cycles, {:.3} GHz", (g1 - g0) as f64 * 1e-6, c1 - c0, (c1 - c0) as f64 / (g1 - g0) as f64);
        }
    }
    let stat = |mut d: Vec<f64>| -> (f64, f64, usize) {
        if d.is_empty() {
            return (0.0, 0.0, 0);
        }
        d.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (d[d.len() / 2], d.iter().sum::<f64>() / d.len() as f64, d.len())
    };
    // Slot k of a chunk, or the latest earlier stamped slot (a variant may skip phases).
    let at = |cta: usize, c: usize, base: usize, k: usize| -> Option<u64> { (0..=k).rev().map(|j| ev(cta, c, base + j)).find(|&t| t != 0) };
    let table = |title: &str, base: usize, names: &[&str]| {
        println!("   {title:<34} {:>8} {:>8}", "median", "mean");
        let mut tot = 0.0;
        for k in (1..names.len()).filter(|&k| !names[k].is_empty()) {
            let mut d = Vec::new();
            for cta in 0..CTAS {
                for c in 2..CH {
                    if let (Some(a), Some(b)) = (at(cta, c, base, k - 1), at(cta, c, base, k)) {
                        if ev(cta, c, base) != 0 && b >= a {
                            d.push((b - a) as f64);
                        }
                    }
                }
            }
            let (md, mean, _) = stat(d);
            tot += mean;
            println!("   {:<34} {md:>8.0} {mean:>8.0}", names[k]);
        }
        let mut per = Vec::new();
        for cta in 0..CTAS {
            for c in 2..CH - 1 {
                let (a, b) = (ev(cta, c, base), ev(cta, c + 1, base));
                if a != 0 && b > a {
                    per.push((b - a) as f64);
                }
            }
        }
        let (md, mean, cnt) = stat(per);
        println!("   {:<34} {md:>8.0} {mean:>8.0}   (sum of phases {tot:.0}; {cnt} samples)", "loop period");
    };
    table("copy thread [cycles]", 0, &PREP_PHASES);
    table("consumer wg1 [cycles]", 16, &CONS_PHASES);
    table("consumer wg2 [cycles]", 24, &CONS_PHASES);
    // Hand-over: the copy thread's issue of chunk c (slot 14) -> consumer wg1 past its pfull
    // wait (slot 17); and how long before wg1 reached chunk c the copies were issued.
    let (mut d, mut lead) = (Vec::new(), Vec::new());
    for cta in 0..CTAS {
        for c in 2..CH {
            let (a, b, top) = (ev(cta, c, 14), ev(cta, c, 17), ev(cta, c, 16));
            if a != 0 && b != 0 {
                d.push(b as f64 - a as f64);
            }
            if a != 0 && top != 0 {
                lead.push(top as f64 - a as f64);
            }
        }
    }
    let (md, mean, _) = stat(d);
    println!("   {:<34} {md:>8.0} {mean:>8.0}", "copies issued -> wg1 past pfull");
    let (md, mean, _) = stat(lead);
    println!("   {:<34} {md:>8.0} {mean:>8.0}   (< 0: issued after wg1 reached the chunk)", "wg1 loop top - copies issued");
    if let Some(f) = ghz.first() {
        println!("   (clock {f:.3} GHz: 1 us = {:.0} cycles)", f * 1e3);
    }
}

/// Every shape whose name contains one of `filters` (all if empty).
pub fn run(rt: &Runtime, filters: &[String]) -> Vec<Record> {
    let want = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let p = |name: &str, lens: &[usize], hqk, hv| Prefill {
        name: name.into(),
        lens: lens.to_vec(),
        hqk,
        hv,
        dk: 128,
        dv: 128,
        attn_frac: None,
        sweep: false,
    };
    let mut shapes = vec![
        p("P1 8x8192 16/16", &[8192; 8], 16, 16),
        p("P2 8x8192 16/32", &[8192; 8], 16, 32),
        p("P3 8x8192 16/64", &[8192; 8], 16, 64),
        p("P4 1x32768 16/32", &[32768], 16, 32),
        p("P5 1x32768 2/8", &[32768], 2, 8),
        p("P6 1x8192 16/64", &[8192], 16, 64),
        p("P7 1024+7168 16/32", &[1024, 7168], 16, 32),
        p("P8 1x2048 16/32", &[2048], 16, 32),
        p("P9 1x65536 16/32", &[65536], 16, 32),
        Prefill {
            name: "d64 8x8192 16/16".into(),
            lens: vec![8192; 8],
            hqk: 16,
            hv: 16,
            dk: 64,
            dv: 64,
            attn_frac: None,
            sweep: false,
        },
    ];
    for f in [0.0, 0.25, 1.0] {
        shapes.push(Prefill {
            name: "natsl-340M 1x32768 6 128/256".into(),
            lens: vec![32768],
            hqk: 6,
            hv: 6,
            dk: 128,
            dv: 256,
            attn_frac: Some(f),
            sweep: false,
        });
        shapes.push(Prefill {
            name: "natsl-760M 1x32768 6 192/384".into(),
            lens: vec![32768],
            hqk: 6,
            hv: 6,
            dk: 192,
            dv: 384,
            attn_frac: Some(f),
            sweep: false,
        });
    }
    // Length sweeps of the model dims, default path only: what the PNG draws (the peers'
    // script has the same shapes).
    for (model, dk, dv) in [("natsl-340M", 128, 256), ("natsl-760M", 192, 384)] {
        for t in [4096usize, 8192, 16384, 32768, 65536] {
            shapes.push(Prefill { name: format!("{model} 1x{t} 6 {dk}/{dv} sweep"), lens: vec![t], hqk: 6, hv: 6, dk, dv, attn_frac: None, sweep: true });
        }
    }
    let mut recs = Vec::new();
    for s in &shapes {
        if want(&s.name) {
            // Prep / scan split for the plain shapes (the lead's profile of where time goes).
            let plain = s.attn_frac.is_none_or(|f| f == 0.0);
            // Context-parallel scan rows for the few-CTA long shapes.
            let cp = plain
                && ["P4 ", "P5 ", "P9 ", "natsl-340M "]
                    .iter()
                    .any(|p| s.name.starts_with(p));
            for r in bench_prefill(rt, s, plain, cp) {
                println!("{:<34} {:<22} {:>9.4} ms", r.shape, r.variant, r.ms);
                recs.push(r);
            }
        }
    }
    for (hqk, hv) in [(16, 16), (16, 32)] {
        for b in [1, 32, 128, 512] {
            for commit in [false, true] {
                if want(&format!("decode B{b} h{hqk}/{hv}")) {
                    let r = bench_decode(rt, b, hqk, hv, 128, commit, None);
                    println!("{:<34} {:<22} {:>9.4} ms", r.shape, r.variant, r.ms);
                    recs.push(r);
                }
            }
            // The previous catalog tile (n32w4) against today's n64w4 (run g also measured
            // n64w8, n32w8, n16w2: slower at every B).
            use natsl_codegen::spec::Tile;
            for tile in [Tile::new(1, 32, 4, 1)] {
                if hv == 32 && want(&format!("decode B{b} h{hqk}/{hv}")) {
                    let r = bench_decode(rt, b, hqk, hv, 128, false, Some(tile));
                    println!("{:<34} {:<22} {:>9.4} ms", r.shape, r.variant, r.ms);
                    recs.push(r);
                }
            }
        }
    }
    recs
}
