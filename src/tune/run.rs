//! `natsl tune`: time every candidate configuration of the families with choices on
//! the GPU at hand, at one representative shape per bucket of the models asked for,
//! and keep the fastest in the cache ([`super`]). Each candidate's output is checked
//! against the heuristic default's first (a candidate that disagrees is dropped); a
//! candidate becomes the choice only where it beats the default by more than
//! [`MARGIN`] (else the entry records `auto`, the heuristics). The file is written
//! after every bucket, so an interrupted run keeps what it measured and the next run
//! skips the buckets already tuned (`--force` re-tunes them).

use super::{store, Choice, Entry, TuneKey};
use crate::bench::{fill, time_it};
use crate::error::Result;
use crate::ops::gdn::{self, GdnOptions, GdnPrefillInputs, GdnPrefillOutputs, GdnWorkspace, PoolIn, PoolOut, PrefillVariant, ScanParallel, ScanTile};
use crate::ops::sparse::{self, BlockMask, PrefillKernel, SparseOptions};
use crate::reference as r;
use crate::{testing, Batch, Runtime, TensorMut, TensorRef};
use half::bf16;
use natsl_codegen::{catalog, Arch, DType, HeadDims, KernelSpec};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

/// A candidate must be this much faster than the default to replace it (noise guard).
pub const MARGIN: f64 = 0.02;
/// Largest relative error against the default's output a candidate may show.
const AGREE: f64 = 2e-2;

/// The dims `natsl tune` tunes for (SPEC.md section 1).
#[derive(Clone, Copy, Debug)]
pub struct Model {
    pub name: &'static str,
    pub d_model: usize,
    /// GDN heads (q/k = value heads) and dims; also the routing heads.
    pub h: usize,
    pub dk: usize,
    pub dv: usize,
    /// Softmax heads and dims.
    pub ha: usize,
    pub dks: usize,
    pub dvs: usize,
}

pub const MODELS: [Model; 2] = [
    Model { name: "natsl-340M", d_model: 1024, h: 6, dk: 128, dv: 256, ha: 12, dks: 64, dvs: 128 },
    Model { name: "natsl-760M", d_model: 1536, h: 6, dk: 192, dv: 384, ha: 18, dks: 64, dvs: 128 },
];

/// Representative (sequences, length) of each tuned bucket: powers of two, so a
/// shape is its bucket's largest.
pub const SHAPES: &[(usize, usize)] = &[(1, 4096), (1, 8192), (1, 16384), (1, 32768), (1, 65536), (4, 4096), (4, 16384), (8, 8192)];
/// `--quick`: three buckets per model and family.
pub const QUICK_SHAPES: &[(usize, usize)] = &[(1, 8192), (1, 32768), (4, 16384)];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Gdn,
    Sparse,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::Gdn, Family::Sparse];
    pub fn name(self) -> &'static str {
        match self {
            Family::Gdn => "gdn",
            Family::Sparse => "sparse",
        }
    }
}

/// What `natsl tune` was asked.
#[derive(Clone, Debug)]
pub struct Args {
    pub models: Vec<Model>,
    pub families: Vec<Family>,
    pub shapes: Vec<(usize, usize)>,
    pub path: PathBuf,
    /// Re-tune buckets that have an entry for this GPU already.
    pub force: bool,
}

/// One timed configuration.
struct Timed {
    choice: Choice,
    ms: f64,
}

/// The outcome of one bucket.
struct Outcome {
    best: Timed,
    default_ms: f64,
    ran: usize,
    dropped: Vec<String>,
}

fn pick(default_ms: f64, default: Choice, timed: Vec<Timed>, dropped: Vec<String>) -> Outcome {
    let ran = timed.len() + 1;
    let best = timed.into_iter().min_by(|a, b| a.ms.total_cmp(&b.ms));
    let best = match best {
        Some(b) if b.ms < default_ms * (1.0 - MARGIN) => b,
        _ => Timed { choice: default, ms: default_ms },
    };
    Outcome { best, default_ms, ran, dropped }
}

/// Every unit the candidates of `families` x `models` use (compiled up front, in parallel).
fn specs(arch: Arch, models: &[Model], families: &[Family]) -> Vec<KernelSpec> {
    let mut v = Vec::new();
    for m in models {
        for f in families {
            match f {
                Family::Gdn => {
                    let (dk, dv) = (m.dk as u32, m.dv as u32);
                    let wide = catalog::gdn_prefill_spec(DType::Bf16, dk, dv, arch);
                    v.extend(gdn::prefill_specs(DType::Bf16, dk, dv, arch));
                    v.extend(gdn::reg_scan_spec(wide));
                    v.extend(gdn::fused_spec(DType::Bf16, dk, dv, arch));
                }
                Family::Sparse => v.push(catalog::sparse_prefill_spec(DType::Bf16, HeadDims { dk: m.dks as u32, dv: m.dvs as u32 }, arch)),
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

/// Run the tuner; prints a line per bucket. Returns (tuned, skipped) bucket counts.
pub fn tune(rt: &Runtime, args: &Args) -> Result<(usize, usize)> {
    let key = TuneKey::of(rt)?;
    let (mut entries, damaged) = match store::load::<Entry>(&args.path) {
        store::Loaded::Missing => (Vec::new(), false),
        store::Loaded::Ok(v) => (v, false),
        store::Loaded::Damaged(why) => {
            println!("{} is damaged ({why}): rebuilding it (the old bytes go to {}.damaged)", args.path.display(), args.path.display());
            (Vec::new(), true)
        }
    };
    let mut damaged = damaged;
    println!(
        "tuning for {} ({} SMs, cc {}, driver {}, {}, NVRTC {}, natsl {}, kernels {}) into {}",
        key.device.gpu,
        key.device.sm_count,
        key.device.compute_capability,
        key.device.driver,
        key.arch,
        key.nvrtc,
        key.natsl,
        key.source_hash,
        args.path.display()
    );
    let foreign = entries.iter().filter(|e| e.key != key).count();
    if foreign > 0 {
        println!("  ({foreign} entries of other GPUs / drivers / versions in the file: kept, not used here)");
    }
    let specs = specs(rt.arch(), &args.models, &args.families);
    let t0 = std::time::Instant::now();
    rt.warmup_with(&specs, |p| {
        if p.seconds > 0.5 || p.error.is_some() {
            println!("  compile [{}/{}] {} {:.1} s{}", p.done, p.total, p.unit, p.seconds, p.error.map_or(String::new(), |e| format!(" FAILED: {e}")));
        }
    })
    .or_else(|e| {
        // A unit that does not compile only drops its candidates (they fail to run).
        println!("  warning: {e}");
        Ok::<(), crate::Error>(())
    })?;
    println!("  {} units ready in {:.1} s", specs.len(), t0.elapsed().as_secs_f64());

    let jobs: Vec<(Family, Model, (usize, usize))> = args.families.iter().flat_map(|&f| args.models.iter().flat_map(move |&m| args.shapes.iter().map(move |&s| (f, m, s)))).collect();
    let (mut tuned, mut skipped) = (0, 0);
    super::set_bypass(true);
    let result = (|| -> Result<()> {
        for (i, &(fam, m, (n, len))) in jobs.iter().enumerate() {
            let lens = vec![len; n];
            let cu = testing::cu_seqlens(&lens);
            let bucket = match fam {
                Family::Gdn => super::gdn_bucket(DType::Bf16, m.dk, m.dv, m.h, m.h, &cu),
                Family::Sparse => super::sparse_bucket(DType::Bf16, m.dks, m.dvs, m.ha, m.ha, true, &cu),
            };
            let shape = format!("{} {n}x{len}", m.name);
            let head = format!("[{}/{}] {bucket} ({shape})", i + 1, jobs.len());
            if !args.force {
                if let Some(e) = entries.iter().find(|e| e.key == key && e.bucket == bucket) {
                    println!("{head}: tuned already ({}), skipped", e.choice);
                    skipped += 1;
                    continue;
                }
            }
            let t = std::time::Instant::now();
            let out = match fam {
                Family::Gdn => tune_gdn(rt, &m, &cu)?,
                Family::Sparse => tune_sparse(rt, &m, &cu)?,
            };
            println!(
                "{head}: {} {:.4} ms, default {:.4} ms ({:.2}x), {} ran{}, {:.1} s",
                out.best.choice,
                out.best.ms,
                out.default_ms,
                out.default_ms / out.best.ms,
                out.ran,
                if out.dropped.is_empty() { String::new() } else { format!(", dropped: {}", out.dropped.join("; ")) },
                t.elapsed().as_secs_f64()
            );
            super::upsert(&mut entries, Entry { key: key.clone(), bucket, choice: out.best.choice, ms: out.best.ms, default_ms: out.default_ms, candidates: out.ran, shape, date: crate::bench::today() });
            store::save(&args.path, &entries, damaged)?;
            damaged = false;
            tuned += 1;
        }
        Ok(())
    })();
    super::set_bypass(false);
    super::reload();
    result?;
    Ok((tuned, skipped))
}

fn rel_err_or_inf(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    r::rel_err(a, b)
}

/// GDN prefill candidates: tiles x context parallelism.
fn gdn_candidates(m: &Model, arch: Arch) -> Vec<PrefillVariant> {
    let v = |tile, cp| PrefillVariant { tile, cp, part: None };
    let mut c = Vec::new();
    for cp in [ScanParallel::Off, ScanParallel::Segments(4), ScanParallel::Segments(8), ScanParallel::Segments(16)] {
        c.push(v(ScanTile::Auto, cp));
    }
    for cp in [ScanParallel::Auto, ScanParallel::Off, ScanParallel::Segments(8)] {
        c.push(v(ScanTile::Wide, cp));
    }
    if m.dk == 128 {
        for cp in [ScanParallel::Auto, ScanParallel::Off, ScanParallel::Segments(8), ScanParallel::Segments(16)] {
            c.push(v(ScanTile::Reg, cp));
        }
    }
    // The fused prefill (fused_prep, then the fused scan) at several cp counts.
    if gdn::fused_supported(m.dk, m.dv, arch) {
        for cp in [ScanParallel::Auto, ScanParallel::Off, ScanParallel::Segments(4), ScanParallel::Segments(16)] {
            c.push(v(ScanTile::Fused, cp));
        }
    }
    c
}

fn tune_gdn(rt: &Runtime, m: &Model, cu: &[i32]) -> Result<Outcome> {
    let t = *cu.last().unwrap() as usize;
    let n = cu.len() - 1;
    let (h, dk, dv) = (m.h, m.dk, m.dv);
    let batch = Batch::new(rt, cu)?;
    let q = fill::<bf16>(rt, t * h * dk, -1.0, 1.0, 1);
    let k = fill::<bf16>(rt, t * h * dk, -1.0, 1.0, 2);
    let v = fill::<bf16>(rt, t * h * dv, -1.0, 1.0, 3);
    let g = fill::<f32>(rt, t * h, -0.1, -0.001, 4);
    let beta = fill::<f32>(rt, t * h, 0.05, 0.95, 5);
    let h0 = fill::<f32>(rt, n * h * dk * dv, -0.5, 0.5, 6);
    let ns = crate::batch::num_slots(t, n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let labels: Vec<u8> = (0..ns * h).map(|_| rng.gen_bool(0.25) as u8).collect();
    let labels = rt.stream().clone_htod(&labels)?;
    let mut o = rt.stream().alloc_zeros::<bf16>(t * h * dv)?;
    let mut st = rt.stream().alloc_zeros::<f32>(n * h * dk * dv)?;
    let mut ws = GdnWorkspace::new();
    let inp = GdnPrefillInputs {
        q: TensorRef::new(&q, &[t, h, dk]),
        k: TensorRef::new(&k, &[t, h, dk]),
        v: TensorRef::new(&v, &[t, h, dv]),
        g: TensorRef::new(&g, &[t, h]),
        beta: TensorRef::new(&beta, &[t, h]),
        labels: Some(TensorRef::new(&labels, &[ns, h])),
        h0: Some(PoolIn { pool: TensorRef::new(&h0, &[n, h, dk, dv]), index: None }),
    };
    let opts = GdnOptions { scale: None, l2norm: true };
    let mut run = |variant: PrefillVariant, o: &mut cudarc::driver::CudaSlice<bf16>| -> Result<(f64, Vec<f64>)> {
        let mut out = GdnPrefillOutputs { o: TensorMut::new(o, &[t, h, dv]), committed: Some(PoolOut { pool: TensorMut::new(&mut st, &[n, h, dk, dv]), index: None }), running: None, gsum_running: None };
        gdn::gdn_prefill_variant(rt, &batch, &inp, &mut out, &opts, &mut ws, variant)?;
        rt.synchronize()?;
        let tm = time_it(rt, 2, 7, |_| gdn::gdn_prefill_variant(rt, &batch, &inp, &mut out, &opts, &mut ws, variant))?;
        drop(out);
        Ok((tm.median_ms, testing::download(rt, o)?))
    };
    let (default_ms, reference) = run(PrefillVariant::default(), &mut o)?;
    let (mut timed, mut dropped) = (Vec::new(), Vec::new());
    for cand in gdn_candidates(m, rt.arch()) {
        let name = Choice::gdn(cand).to_string();
        rt.stream().memset_zeros(&mut o)?;
        match run(cand, &mut o) {
            Ok((ms, out)) => {
                let e = rel_err_or_inf(&out, &reference);
                if e <= AGREE {
                    timed.push(Timed { choice: Choice::gdn(cand), ms });
                } else {
                    dropped.push(format!("{name} (rel err {e:.1e})"));
                }
            }
            Err(e) if is_plan_error(&e) => {}
            Err(e) => dropped.push(format!("{name} ({e})")),
        }
        rt.synchronize()?;
    }
    Ok(pick(default_ms, Choice::gdn(PrefillVariant::default()), timed, dropped))
}

/// An error of planning or argument checking (the candidate does not apply to this shape).
fn is_plan_error(e: &crate::Error) -> bool {
    matches!(e, crate::Error::InvalidArgument { .. } | crate::Error::Unsupported(_))
}

fn tune_sparse(rt: &Runtime, m: &Model, cu: &[i32]) -> Result<Outcome> {
    let t = *cu.last().unwrap() as usize;
    let n = cu.len() - 1;
    let (hq, hr, dk, dv) = (m.ha, m.h, m.dks, m.dvs);
    let batch = Batch::new(rt, cu)?;
    let q = fill::<bf16>(rt, t * hq * dk, -1.0, 1.0, 1);
    let k = fill::<bf16>(rt, t * hq * dk, -1.0, 1.0, 2);
    let v = fill::<bf16>(rt, t * hq * dv, -1.0, 1.0, 3);
    let mut o = rt.stream().alloc_zeros::<bf16>(t * hq * dv)?;
    let ns = r::num_slots(t, n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let labels: Vec<u8> = (0..ns * hr).map(|_| if rng.gen_bool(0.25) { r::LABEL_ATTN } else { r::LABEL_GDN }).collect();
    let (list, count) = r::attn_list_from_labels(&labels, cu, hr);
    let ld = rt.stream().clone_htod(&list)?;
    let cd = rt.stream().clone_htod(&count)?;
    let mask = BlockMask::Routed { attn_list: TensorRef::new(&ld, &[hr, ns]), attn_count: TensorRef::new(&cd, &[n, hr]) };
    let (qv, kv, vv) = (TensorRef::new(&q, &[t, hq, dk]), TensorRef::new(&k, &[t, hq, dk]), TensorRef::new(&v, &[t, hq, dv]));
    let run = |kernel: PrefillKernel, o: &mut cudarc::driver::CudaSlice<bf16>| -> Result<(f64, Vec<f64>)> {
        let opts = SparseOptions { kernel, ..Default::default() };
        let mut ov = TensorMut::new(o, &[t, hq, dv]);
        sparse::prefill(rt, &batch, &qv, &kv, &vv, &mask, &opts, &mut ov, None)?;
        rt.synchronize()?;
        let tm = time_it(rt, 2, 7, |_| sparse::prefill(rt, &batch, &qv, &kv, &vv, &mask, &opts, &mut ov, None))?;
        drop(ov);
        Ok((tm.median_ms, testing::download(rt, o)?))
    };
    let (default_ms, reference) = run(PrefillKernel::Auto, &mut o)?;
    let (mut timed, mut dropped) = (Vec::new(), Vec::new());
    for kernel in sparse::prefill_kernels(rt) {
        rt.stream().memset_zeros(&mut o)?;
        match run(kernel, &mut o) {
            Ok((ms, out)) => {
                let e = rel_err_or_inf(&out, &reference);
                if e <= AGREE {
                    timed.push(Timed { choice: Choice::sparse(kernel), ms });
                } else {
                    dropped.push(format!("{kernel:?} (rel err {e:.1e})"));
                }
            }
            Err(e) if is_plan_error(&e) => {}
            Err(e) => dropped.push(format!("{kernel:?} ({e})")),
        }
    }
    Ok(pick(default_ms, Choice::sparse(PrefillKernel::Auto), timed, dropped))
}

