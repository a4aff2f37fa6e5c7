//! The natsl command-line tool.
//!
//!   natsl [run]          the main job: run every op on a NAtS-L-340M-shaped input,
//!                        check it against the f64 reference, time it (GPU); without
//!                        a GPU, compile the kernels through NVRTC and run the CPU reference
//!   natsl kernels        list every shipped specialisation
//!   natsl compile        compile every shipped specialisation (NVRTC) and print ptxas' report
//!   natsl bench [FAMILY] time the kernels (router, gdn, sparse, all), print a table and
//!                        append JSON lines to bench/results/

use natsl::bench::{self, Record};
use natsl::ops::router::{route_into, RouterOptions, RouterOutput};
use natsl::reference::{self as r};
use natsl::{jit, testing, Batch, Runtime, TensorRef};
use natsl_codegen::{catalog, emit};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("run");
    let result = match cmd {
        "run" => run(),
        "kernels" => kernels(),
        "compile" => compile(),
        "bench" => bench_cmd(args.get(1).map(String::as_str).unwrap_or("all")),
        "-h" | "--help" | "help" => {
            println!("usage: natsl [run | kernels | compile | bench [router|gdn|sparse|all]]");
            Ok(())
        }
        other => Err(format!("unknown command `{other}` (try `natsl help`)").into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("natsl: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn kernels() -> Res {
    let specs = catalog::shipped();
    println!("{} shipped specialisations (anything else is generated and JIT-compiled on first use):", specs.len());
    for s in &specs {
        let u = emit(s)?;
        println!("  {:<60} entries: {}", s.symbol(), u.entries.join(", "));
    }
    Ok(())
}

/// Compile every shipped unit through NVRTC; returns (units, seconds).
fn compile_all(verbose: bool) -> Result<(usize, f64), Box<dyn std::error::Error>> {
    let t0 = std::time::Instant::now();
    let specs = catalog::shipped();
    for s in &specs {
        let u = emit(s)?;
        let img = jit::compile_uncached(&u.name, &u.source, &jit::options(s.arch))?;
        if verbose {
            for rep in jit::parse_ptxas(&img.log) {
                println!("  {:<72} {:>3} regs {:>6} B smem  spills {}/{}", rep.function, rep.registers, rep.smem, rep.spill_stores, rep.spill_loads);
            }
        }
    }
    Ok((specs.len(), t0.elapsed().as_secs_f64()))
}

fn compile() -> Res {
    let (v, _) = (jit::nvrtc_version()?, ());
    println!("NVRTC {}.{}", v.0, v.1);
    let (n, secs) = compile_all(true)?;
    println!("{n} units compiled in {secs:.1} s");
    Ok(())
}

fn run() -> Res {
    match Runtime::new(0) {
        Ok(rt) => run_gpu(&rt),
        Err(e) => {
            println!("no CUDA device ({e}): running the CPU-side checks only.");
            match jit::nvrtc_version() {
                Ok(v) => {
                    let (n, secs) = compile_all(false)?;
                    println!("NVRTC {}.{}: compiled all {n} shipped kernel units for sm_80 and sm_90a in {secs:.1} s.", v.0, v.1);
                }
                Err(e) => println!("NVRTC not available ({e}); kernels not compiled."),
            }
            cpu_reference_demo();
            Ok(())
        }
    }
}

/// natsl-340M layer dims (SPEC.md section 1).
fn dims_340m() -> r::NatslDims {
    r::NatslDims { d_model: 1024, h: 6, dk: 128, dv: 256, ha: 12, dks: 64, dvs: 128 }
}

/// The whole NAtS-L layer on the CPU reference: prefill, then decode, checked
/// against the prefill of the longer sequence.
fn cpu_reference_demo() {
    let d = dims_340m();
    let (t0, extra) = (150usize, 20usize);
    let t = t0 + extra;
    let mut rng = testing::rng(3);
    let x = testing::rand_vec(&mut rng, t * d.d_model, 1.0);
    let q = testing::rand_vec(&mut rng, t * d.h * d.dk, 1.0);
    let k = testing::rand_vec(&mut rng, t * d.h * d.dk, 1.0);
    let v = testing::rand_vec(&mut rng, t * d.h * d.dv, 1.0);
    let g = testing::rand_range(&mut rng, t * d.h, -0.2, -0.01);
    let beta = testing::rand_range(&mut rng, t * d.h, 0.05, 0.95);
    let w = testing::rand_vec(&mut rng, t * d.ha * 2, 1.0);
    let z = testing::rand_vec(&mut rng, t * d.ha * d.dvs, 1.0);
    let w_score = testing::rand_vec(&mut rng, 2 * d.h * d.d_model, 0.05);
    let gamma = testing::rand_range(&mut rng, d.dvs, 0.5, 1.5);
    let layer = r::NatslLayer { dims: d, w_score: &w_score, gamma_gdn: &gamma, gamma_att: &gamma, q_norm_w: None, k_norm_w: None, l2norm: true, gdn_scale: None, att_scale: None, round: r::round_bf16 };
    let slice = |a: &[f64], per: usize, n: usize| a[..n * per].to_vec();
    let start = std::time::Instant::now();
    let full = r::layer_prefill(&layer, &r::LayerInputs { x: &x, q: &q, k: &k, v: &v, g: &g, beta: &beta, w: &w, z: &z }, &[0, t as i32]);
    let (xs, qs, ks, vs, gs, bs, ws, zs) = (slice(&x, d.d_model, t0), slice(&q, d.h * d.dk, t0), slice(&k, d.h * d.dk, t0), slice(&v, d.h * d.dv, t0), slice(&g, d.h, t0), slice(&beta, d.h, t0), slice(&w, d.ha * 2, t0), slice(&z, d.ha * d.dvs, t0));
    let mut pre = r::layer_prefill(&layer, &r::LayerInputs { x: &xs, q: &qs, k: &ks, v: &vs, g: &gs, beta: &bs, w: &ws, z: &zs }, &[0, t0 as i32]);
    let mut dec = Vec::new();
    let inputs = r::LayerInputs { x: &x, q: &q, k: &k, v: &v, g: &g, beta: &beta, w: &w, z: &z };
    for i in t0..t {
        dec.extend(r::decode_step(&layer, &mut pre.caches[0], &inputs.token(i, &d)));
    }
    let per = d.ha * d.dvs;
    let err = r::rel_err(&dec, &full.out[t0 * per..t * per]);
    let attn = full.router.labels.iter().filter(|&&l| l == r::LABEL_ATTN).count();
    println!(
        "CPU reference, natsl-340M layer dims (D 1024, 6 GDN heads 128/256, 12 softmax heads 64/128): prefill of {t0} tokens + {extra} decode steps vs prefill of {t}: rel err {err:.1e}; {attn} of {} chunk labels ATTN; {:.2} s",
        full.router.labels.len(),
        start.elapsed().as_secs_f64()
    );
}

fn run_gpu(rt: &Runtime) -> Res {
    println!("device: {} ({:?} path, {} SMs)", rt.context().name()?, rt.arch(), rt.sm_count());
    let mut records: Vec<Record> = Vec::new();
    // Router on the natsl-340M width, a ragged batch of ~32k tokens.
    let d = dims_340m();
    let lens = [8192usize, 8000, 8256, 8321];
    let cu = testing::cu_seqlens(&lens);
    let t = *cu.last().unwrap() as usize;
    let mut rng = testing::rng(11);
    let x = testing::quantize::<half::bf16>(&testing::rand_vec(&mut rng, t * d.d_model, 1.0));
    let w = testing::quantize::<half::bf16>(&testing::rand_vec(&mut rng, 2 * d.h * d.d_model, 0.05));
    let reference = r::router(&x, &w, &cu, d.d_model, d.h, r::RouterPolicy::Argmax, r::round_bf16);
    let batch = Batch::new(rt, &cu)?;
    let xd = testing::upload::<half::bf16>(rt, &x)?;
    let wd = testing::upload::<half::bf16>(rt, &w)?;
    let mut out = RouterOutput::alloc(rt, &batch, d.h, d.d_model, false)?;
    let (xv, wv) = (TensorRef::new(&xd, &[t, d.d_model]), TensorRef::new(&wd, &[2 * d.h, d.d_model]));
    route_into(rt, &batch, &xv, &wv, &RouterOptions::default(), &mut out)?;
    let labels: Vec<u8> = rt.stream().clone_dtoh(&out.labels)?;
    let mut used = 0;
    let mut diff = 0;
    for n in 0..lens.len() {
        for c in 0..r::n_chunks(lens[n]) {
            for h in 0..d.h {
                let i = (r::slot_base(&cu, n) + c) * d.h + h;
                used += 1;
                diff += (labels[i] != reference.labels[i]) as usize;
            }
        }
    }
    println!("router: {used} labels checked against the f64 reference, {diff} differ (near ties)");
    let timing = bench::time_it(rt, 5, 50, |_| Ok(route_into(rt, &batch, &xv, &wv, &RouterOptions::default(), &mut out)?))?;
    records.push(Record::new(rt, "router", format!("T={t} D={} Hr={}", d.d_model, d.h), "argmax".into(), &timing, 2.0 * (t * d.d_model * 2 * d.h) as f64, (t * d.d_model * 2) as f64));
    bench::print_table(&records);
    if diff * 100 > used {
        return Err("router labels disagree with the reference beyond near ties".into());
    }
    Ok(())
}

fn bench_cmd(family: &str) -> Res {
    let rt = match Runtime::new(0) {
        Ok(rt) => rt,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return Ok(());
        }
    };
    let mut all = Vec::new();
    if matches!(family, "router" | "all") {
        let recs = bench::router::run(&rt, bench::router::SHAPES)?;
        println!("results: {}", bench::write_results("router", &recs)?.display());
        all.extend(recs);
    }
    bench::print_table(&all);
    Ok(())
}
