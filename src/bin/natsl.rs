//! The natsl command-line tool.
//!
//!   natsl [run]          the main job: run every op on a NAtS-L-340M-shaped input,
//!                        check it against the f64 reference, time it (GPU); without
//!                        a GPU, compile the kernels through NVRTC and run the CPU reference
//!   natsl kernels        list every shipped specialisation
//!   natsl compile [NAME] compile the shipped specialisations whose unit name contains NAME (NVRTC), print ptxas'
//!                        report; with NATSL_DUMP_DIR set, also write each unit's .cu, .cubin and ptxas .log there
//!   natsl warmup         load or compile (with progress) every unit natsl-340M uses on device 0
//!   natsl bench [FAMILY] [FILTER...] [--peers FILE]
//!                        time the kernels (router, gdn, sparse, merge, chain, all; shapes whose name
//!                        contains a filter), print a table, append JSON lines to bench/results/
//!                        and draw PNGs there; `natsl bench peaks` measures the GPU's ceilings
//!   natsl tune           time the kernel choices per shape bucket, keep the best per GPU

use natsl::bench::{self, Record};
use natsl::ops::router::{route_into, RouterOptions, RouterOutput};
use natsl::reference::{self as r};
use natsl::{jit, testing, Batch, Runtime, TensorRef};
use natsl_codegen::{catalog, emit};
use std::process::ExitCode;

fn main() -> ExitCode {
    // `natsl kernels | head`: end quietly on a closed pipe, as Unix tools do, instead
    // of panicking in println! (Rust ignores SIGPIPE by default).
    // SAFETY: sets a signal disposition at startup, before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("run");
    let result = match cmd {
        "run" => run(),
        "kernels" => kernels(),
        "compile" => compile(args.get(1).map(String::as_str).unwrap_or("")),
        "warmup" => warmup(),
        _ if wants_help(args.get(1..).unwrap_or(&[])) => {
            println!("{}", help_of(cmd));
            Ok(())
        }
        "bench" => bench_cmd(args.get(1).map(String::as_str).unwrap_or("all"), args.get(2..).unwrap_or(&[])),
        "tune" => tune_cmd(&args[1..]),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
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

const USAGE: &str = "usage: natsl [COMMAND] [--help]

commands:
  run                  the main job (default): every op on a natsl-340M-shaped input, checked and timed
  kernels              list the shipped specialisations
  compile [NAME]       NVRTC + ptxas report of the shipped units whose name contains NAME
  warmup               load or compile natsl-340M's units on device 0
  bench [FAMILY] ...   time kernels: router, gdn, sparse, merge, layer (the one-call layer prefill), chain, all, or peaks (the GPU's ceilings)
  tune                 time the kernel choices for natsl-340M / 760M shapes, keep the best per GPU

`natsl COMMAND --help` describes one command.";

fn wants_help(rest: &[String]) -> bool {
    rest.iter().any(|a| a == "-h" || a == "--help")
}

fn help_of(cmd: &str) -> String {
    match cmd {
        "run" => "usage: natsl run\n\nOn a GPU: runs the router, the GDN prefill and the sparse softmax on a natsl-340M-shaped input, checks them\nagainst the f64 reference and prints times. Without a GPU: compiles every shipped unit (when NVRTC is\ninstalled) and runs the whole layer on the CPU reference.".into(),
        "kernels" => "usage: natsl kernels\n\nLists every shipped specialisation and its entry points.".into(),
        "compile" => "usage: natsl compile [NAME]\n\nCompiles the shipped units whose name contains NAME through NVRTC and prints ptxas' report (registers,\nshared memory, spills). NATSL_DUMP_DIR=DIR also keeps each unit's .cu, .cubin and log there.".into(),
        "warmup" => "usage: natsl warmup\n\nLoads or compiles (with progress) every unit natsl-340M's calls use on device 0.".into(),
        "bench" => BENCH_HELP.into(),
        "tune" => TUNE_HELP.into(),
        _ => USAGE.into(),
    }
}

const TUNE_HELP: &str = "usage: natsl tune [--model 340m|760m|all] [--family gdn|sparse|all] [--quick] [--force] [--file PATH] [--show]

Times every candidate configuration of the families with kernel choices (GDN prefill: scan tile, context-parallel
segments, the fused prefill; sparse prefill: kernel; the router has one kernel) on device 0, at one
shape per bucket of the models' dims (1 x 4k..64k tokens, 4 x 4k and 16k, 8 x 8k; --quick: 1 x 8k, 1 x 32k, 4 x 16k),
and keeps the fastest per bucket in a cache keyed by GPU name, SM count, compute capability, driver, code path, NVRTC
version, natsl version and kernel source hash. A candidate must agree with the default's output and beat it by 2%.
Calls whose shape falls in a tuned bucket use the choice (one log line per bucket); entries of other GPUs or versions
are ignored. The file is written after each bucket: an interrupted run resumes where it stopped (--force re-tunes).

  --file PATH   the cache (default: $NATSL_TUNE_CACHE, else tune.json in natsl's cache folder, ~/.cache/natsl)
  --show        print the cache's entries and exit (no GPU needed)";

const BENCH_HELP: &str = "usage: natsl bench [router|gdn|sparse|merge|layer|chain|all] [SHAPE FILTERS...] [--peers FILE]... [--no-plot]
       natsl bench peaks [--force]

Times the kernels with CUDA events (warm-up, CUDA-graph replays, median), prints time, TFLOP/s, TB/s and the fraction
of the roofline of this GPU, appends JSON lines to bench/results/<family>-<date>.jsonl and draws
bench/results/<family>-<date>-<op>.png: time and TFLOP/s (TB/s for decode and memory-bound ops) against sequence length or
batch, the roofline, and the peers of each --peers file (JSON lines with op, shape, variant, ms and tflops / tbps, as
bench/peers/*.py write). `layer`: the one-call layer prefill (`layer::prefill`, two streams and one). `chain`: the layer's prefill as its four kernels in a row (router, GDN, sparse, merge) at
natsl-340M / 760M dims, each alone and together.

`natsl bench peaks` measures the GPU's ceilings once (a bf16 tensor-core loop: wgmma on sm_90a, mma.sync everywhere;
a 16-byte-vector device copy and cuMemcpyDtoD) and caches them in peaks.json beside the tune cache, keyed by GPU
name, SM count, compute capability and driver (--force measures again). Without that entry the roofline uses the
H200's constants (771 TFLOP/s, 4.2 TB/s) and says so.";

fn kernels() -> Res {
    let specs = catalog::shipped();
    println!("{} shipped specialisations (anything else is generated and JIT-compiled on first use):", specs.len());
    for s in &specs {
        let u = emit(s)?;
        println!("  {:<60} entries: {}", s.symbol(), u.entries.join(", "));
    }
    Ok(())
}

/// Compile every shipped unit through NVRTC, one unit per core at a time (NVRTC
/// is thread-safe); returns (units, seconds). With `verbose`, prints ptxas' report.
fn compile_all(verbose: bool, filter: &str) -> Result<(usize, f64), Box<dyn std::error::Error>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let t0 = std::time::Instant::now();
    let specs: Vec<_> = catalog::shipped().into_iter().filter(|s| emit(s).map_or(true, |u| u.name.contains(filter))).collect();
    let next = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(specs.len().max(1));
    let results: Vec<Result<Vec<jit::PtxasReport>, String>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(s) = specs.get(i) else { break };
                        let t_unit = std::time::Instant::now();
                        let r = emit(s).map_err(|e| e.to_string()).and_then(|u| {
                            let img = jit::compile_uncached(&u.name, &u.source, &jit::options(s.arch)).map_err(|e| e.to_string())?;
                            // NATSL_DUMP_DIR: keep each unit's source and cubin (for cuobjdump -sass).
                            if let Some(dir) = std::env::var_os("NATSL_DUMP_DIR") {
                                let dir = std::path::Path::new(&dir);
                                let write = |ext: &str, bytes: &[u8]| std::fs::write(dir.join(format!("{}.{ext}", u.name)), bytes).map_err(|e| e.to_string());
                                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                                write("cu", u.source.as_bytes())?;
                                write("cubin", &img.cubin)?;
                                write("log", img.log.as_bytes())?;
                            }
                            Ok(img)
                        });
                        // Progress as each unit finishes: a cold compile takes a while.
                        let k = finished.fetch_add(1, Ordering::Relaxed) + 1;
                        if verbose {
                            eprintln!("[{k}/{}] {} {:.1} s{}", specs.len(), s.symbol(), t_unit.elapsed().as_secs_f64(), if r.is_err() { " FAILED" } else { "" });
                        }
                        done.push((i, r.map(|img| jit::parse_ptxas(&img.log))));
                    }
                    done
                })
            })
            .collect();
        let mut all: Vec<_> = workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, r)| r).collect()
    });
    for r in &results {
        match r {
            Err(e) => return Err(e.clone().into()),
            Ok(reports) if verbose => {
                for rep in reports {
                    println!("  {:<72} {:>3} regs {:>6} B smem  spills {}/{}", rep.function, rep.registers, rep.smem, rep.spill_stores, rep.spill_loads);
                }
            }
            Ok(_) => {}
        }
    }
    Ok((specs.len(), t0.elapsed().as_secs_f64()))
}

fn compile(filter: &str) -> Res {
    let (v, _) = (jit::nvrtc_version()?, ());
    println!("NVRTC {}.{}", v.0, v.1);
    let (n, secs) = compile_all(true, filter)?;
    println!("{n} units compiled in {secs:.1} s");
    Ok(())
}

/// Load (compile on a miss) every unit that NAtS-L-340M's calls use on device 0,
/// with a line per unit: what an engine does once at start-up with `Runtime::warmup`.
fn warmup() -> Res {
    let rt = Runtime::new(0)?;
    let specs = natsl::ops::ModelKernels::natsl_340m().specs(rt.arch());
    let t0 = std::time::Instant::now();
    rt.warmup(&specs)?;
    println!("{} units of natsl-340M ready on {:?} in {:.1} s", specs.len(), rt.arch(), t0.elapsed().as_secs_f64());
    Ok(())
}

fn run() -> Res {
    match Runtime::new(0) {
        Ok(rt) => run_gpu(&rt),
        Err(e) => {
            println!("no CUDA device ({e}): running the CPU-side checks only.");
            match jit::nvrtc_version() {
                Ok(v) => {
                    let (n, secs) = compile_all(false, "")?;
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

/// The NAtS-L-340M layer's three kernels on one synthetic input of `lens`: the
/// router (argmax) labels the chunks, the GDN scan commits with those labels,
/// and the sparse softmax reads the router's lists through strided head views
/// of the same q/k/v memory (SPEC.md section 1). Returns the host copies the
/// reference needs and the device time of each op when `time` is set.
struct Layer340 {
    cu: Vec<i32>,
    t: usize,
    x: Vec<f64>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    g: Vec<f64>,
    beta: Vec<f64>,
    w_score: Vec<f64>,
}

fn layer_inputs(lens: &[usize], seed: u64) -> Layer340 {
    use half::bf16;
    let d = dims_340m();
    let cu = testing::cu_seqlens(lens);
    let t = *cu.last().unwrap() as usize;
    let mut rng = testing::rng(seed);
    let q = testing::quantize::<bf16>(&testing::rand_vec(&mut rng, t * d.h * d.dk, 1.0));
    let k = testing::quantize::<bf16>(&testing::rand_vec(&mut rng, t * d.h * d.dk, 1.0));
    let v = testing::quantize::<bf16>(&testing::rand_vec(&mut rng, t * d.h * d.dv, 1.0));
    let g = testing::rand_range(&mut rng, t * d.h, -0.1, -0.005).iter().map(|&x| x as f32 as f64).collect();
    let beta = testing::rand_range(&mut rng, t * d.h, 0.05, 0.95).iter().map(|&x| x as f32 as f64).collect();
    let x = testing::quantize::<bf16>(&testing::rand_vec(&mut rng, t * d.d_model, 1.0));
    let w_score = testing::quantize::<bf16>(&testing::rand_vec(&mut rng, 2 * d.h * d.d_model, 0.05));
    Layer340 { cu, t, x, q, k, v, g, beta, w_score }
}

/// Run (and optionally time) the three ops; returns (labels, o_gdn, o_att) and records.
fn run_layer(rt: &Runtime, l: &Layer340, time: bool) -> Result<(Vec<u8>, Vec<f64>, Vec<f64>, Vec<Record>), Box<dyn std::error::Error>> {
    use half::bf16;
    use natsl::ops::gdn::{gdn_prefill, GdnOptions, GdnPrefillInputs, GdnPrefillOutputs, GdnWorkspace};
    use natsl::ops::sparse::{self, BlockMask, SparseOptions};
    use natsl::TensorMut;
    let d = dims_340m();
    let (t, n) = (l.t, l.cu.len() - 1);
    let batch = Batch::new(rt, &l.cu)?;
    let ns = batch.num_slots();
    let (xd, wd) = (testing::upload::<bf16>(rt, &l.x)?, testing::upload::<bf16>(rt, &l.w_score)?);
    let (qd, kd, vd) = (testing::upload::<bf16>(rt, &l.q)?, testing::upload::<bf16>(rt, &l.k)?, testing::upload::<bf16>(rt, &l.v)?);
    let (gd, bd) = (testing::upload::<f32>(rt, &l.g)?, testing::upload::<f32>(rt, &l.beta)?);
    let mut og = testing::poisoned::<bf16>(rt, t * d.h * d.dv)?;
    let mut oa = testing::poisoned::<bf16>(rt, t * d.ha * d.dvs)?;
    let mut records = Vec::new();

    // Router.
    let (xv, wv) = (TensorRef::new(&xd, &[t, d.d_model]), TensorRef::new(&wd, &[2 * d.h, d.d_model]));
    let mut rout = RouterOutput::alloc(rt, &batch, d.h, d.d_model, false)?;
    route_into(rt, &batch, &xv, &wv, &RouterOptions::default(), &mut rout)?;
    if time {
        let tm = bench::time_it(rt, 3, 20, |_| Ok(route_into(rt, &batch, &xv, &wv, &RouterOptions::default(), &mut rout)?))?;
        records.push(Record::new(rt, "router", format!("340M T={t}"), "argmax".into(), &tm, 2.0 * (t * d.d_model * 2 * d.h) as f64, (t * d.d_model * 2) as f64));
    }

    // GDN with the router's labels ([num_slots, 6]: one routing head per GDN head).
    let inp = GdnPrefillInputs {
        q: TensorRef::new(&qd, &[t, d.h, d.dk]),
        k: TensorRef::new(&kd, &[t, d.h, d.dk]),
        v: TensorRef::new(&vd, &[t, d.h, d.dv]),
        g: TensorRef::new(&gd, &[t, d.h]),
        beta: TensorRef::new(&bd, &[t, d.h]),
        labels: Some(TensorRef::new(&rout.labels, &[ns, d.h])),
        h0: None,
    };
    let mut ws = GdnWorkspace::new();
    let opts = GdnOptions { scale: None, l2norm: true };
    {
        let mut out = GdnPrefillOutputs { o: TensorMut::new(&mut og, &[t, d.h, d.dv]), committed: None, running: None, gsum_running: None };
        gdn_prefill(rt, &batch, &inp, &mut out, &opts, &mut ws)?;
        if time {
            let tm = bench::time_it(rt, 2, 10, |_| gdn_prefill(rt, &batch, &inp, &mut out, &opts, &mut ws))?;
            let flops = (t * d.h) as f64 * (6.0 * (d.dk * d.dv) as f64 + 256.0 * (d.dk + d.dv) as f64);
            records.push(Record::new(rt, "gdn_prefill", format!("340M T={t}"), "router labels".into(), &tm, flops, (t * d.h * (2 * d.dk + 2 * d.dv) * 2) as f64));
        }
    }

    // Sparse softmax: 12 heads of 64/128 as strided views of the GDN q/k/v rows.
    let qs = TensorRef::strided(&qd, &[t, d.ha, d.dks], &[d.h * d.dk, d.dks, 1]);
    let ks = TensorRef::strided(&kd, &[t, d.ha, d.dks], &[d.h * d.dk, d.dks, 1]);
    let vs = TensorRef::strided(&vd, &[t, d.ha, d.dvs], &[d.h * d.dv, d.dvs, 1]);
    let mask = BlockMask::Routed { attn_list: TensorRef::new(&rout.attn_list, &[d.h, ns]), attn_count: TensorRef::new(&rout.attn_count, &[n, d.h]) };
    let sopts = SparseOptions::default();
    {
        let mut ov = TensorMut::new(&mut oa, &[t, d.ha, d.dvs]);
        sparse::prefill(rt, &batch, &qs, &ks, &vs, &mask, &sopts, &mut ov, None)?;
        if time {
            let tm = bench::time_it(rt, 2, 10, |_| sparse::prefill(rt, &batch, &qs, &ks, &vs, &mask, &sopts, &mut ov, None))?;
            let labels: Vec<u8> = rt.stream().clone_dtoh(&rout.labels)?;
            let flops = visible_pairs(&l.cu, &labels, d.h, d.ha) * 2.0 * (d.dks + d.dvs) as f64;
            records.push(Record::new(rt, "sparse_prefill", format!("340M T={t}"), "router lists".into(), &tm, flops, (t * d.ha * (2 * d.dks + 2 * d.dvs) * 2) as f64));
        }
    }
    rt.synchronize()?;
    let labels: Vec<u8> = rt.stream().clone_dtoh(&rout.labels)?;
    Ok((labels, testing::download(rt, &og)?, testing::download(rt, &oa)?, records))
}

/// (query, key) pairs the sparse softmax visits: per query chunk, the kept
/// earlier chunks plus its own chunk causally.
fn visible_pairs(cu: &[i32], labels: &[u8], hr: usize, hq: usize) -> f64 {
    let mut pairs = 0.0;
    for n in 0..cu.len() - 1 {
        let len = (cu[n + 1] - cu[n]) as usize;
        let base = r::slot_base(cu, n);
        for h in 0..hr {
            let mut before = 0usize;
            for c in 0..r::n_chunks(len) {
                let rows = (len - c * 64).min(64);
                pairs += (hq / hr) as f64 * (rows * before * 64 + rows * (rows + 1) / 2) as f64;
                before += (labels[(base + c) * hr + h] == r::LABEL_ATTN) as usize;
            }
        }
    }
    pairs
}

fn run_gpu(rt: &Runtime) -> Res {
    println!("device: {} ({:?} path, {} SMs)", rt.context().name()?, rt.arch(), rt.sm_count());
    if bench::peaks::use_measured(rt).is_none() {
        println!("(roofline: the built-in H200 constants; `natsl bench peaks` measures this GPU's)");
    }
    let d = dims_340m();
    // 1. Check: a ragged batch small enough for the f64 reference.
    let l = layer_inputs(&[700, 1000, 64, 300], 5);
    let (labels, og, oa, _) = run_layer(rt, &l, false)?;
    let reference_router = r::router(&l.x, &l.w_score, &l.cu, d.d_model, d.h, r::RouterPolicy::Argmax, r::round_bf16);
    let flips = labels.iter().zip(&reference_router.labels).enumerate().filter(|(i, (a, b))| a != b && { let s = i / d.h; (0..l.cu.len() - 1).any(|n| s >= r::slot_base(&l.cu, n) && s < r::slot_base(&l.cu, n) + r::n_chunks((l.cu[n + 1] - l.cu[n]) as usize)) }).count();
    let gdn_ref = r::gdn_chunked(&r::GdnProblem { q: &l.q, k: &l.k, v: &l.v, g: &l.g, beta: &l.beta, cu_seqlens: &l.cu, hqk: d.h, hv: d.h, dk: d.dk, dv: d.dv, labels: Some((&labels, d.h)), h0: None, scale: None, l2norm: true });
    // Softmax head j is the j-th 64/128-wide slice of the same rows: in the
    // reference's contiguous [T, H, D] layout that is the same memory re-cut.
    let (qs, ks, vs) = (&l.q, &l.k, &l.v);
    let att_ref = r::sparse_attention(&r::AttnProblem { q: qs, k: ks, v: vs, cu_seqlens: &l.cu, hq: d.ha, hkv: d.ha, dk: d.dks, dv: d.dvs, scale: None, q_norm_w: None, k_norm_w: None }, &labels, d.h);
    let (e_gdn, e_att) = (r::rel_err(&og, &gdn_ref.o), r::rel_err(&oa, &att_ref.o));
    let attn = labels.iter().filter(|&&x| x == r::LABEL_ATTN).count();
    println!("check on {} tokens in 4 sequences (natsl-340M dims; the reference uses the GPU router's labels):", l.t);
    println!("  router: {flips} labels differ from the f64 reference (near ties); {attn} chunk-heads ATTN");
    println!("  gdn prefill (6 heads 128/256, chunk commit): rel err {e_gdn:.2e} (tol 1e-2)");
    println!("  sparse softmax (12 heads 64/128, strided views, router lists): rel err {e_att:.2e} (tol 1e-2)");
    // 2. Time: one 32k sequence.
    let big = layer_inputs(&[32768], 6);
    let (_, _, _, records) = run_layer(rt, &big, true)?;
    bench::print_table(&records);
    if !(e_gdn <= 1e-2 && e_att <= 1e-2) || flips * 100 > labels.len() {
        return Err("a kernel disagrees with the f64 reference".into());
    }
    Ok(())
}

fn bench_cmd(family: &str, args: &[String]) -> Res {
    if !matches!(family, "router" | "gdn" | "sparse" | "merge" | "layer" | "chain" | "all" | "peaks") {
        return Err(format!("unknown bench family `{family}` (router, gdn, sparse, merge, layer, chain, all, peaks; see `natsl bench --help`)").into());
    }
    let (mut filters, mut peer_files, mut plot, mut force) = (Vec::new(), Vec::new(), true, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--peers" => peer_files.push(it.next().ok_or("`--peers` needs a results file")?.clone()),
            "--no-plot" => plot = false,
            "--force" if family == "peaks" => force = true,
            f if f.starts_with("--") => return Err(format!("unknown argument `{f}` (see `natsl bench --help`)").into()),
            f => filters.push(f.to_string()),
        }
    }
    let rt = match Runtime::new(0) {
        Ok(rt) => rt,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return Ok(());
        }
    };
    if family == "peaks" {
        println!("device: {} ({} SMs, {:?} path)", rt.context().name()?, rt.sm_count(), rt.arch());
        let (p, cached) = bench::peaks::measure_or_cached(&rt, force)?;
        println!(
            "peaks{}: {:.1} TFLOP/s bf16 (mma.sync {:.1}{}), {:.2} TB/s (copy kernel {:.2}, cuMemcpyDtoD {:.2}); {} {}",
            if cached { " (cached; --force measures again)" } else { "" },
            p.tflops,
            p.mma_sync_tflops,
            p.wgmma_tflops.map_or(String::new(), |w| format!(", wgmma {w:.1}")),
            p.tbps,
            p.copy_kernel_tbps,
            p.memcpy_tbps,
            p.date,
            p.commit
        );
        return Ok(());
    }
    match bench::peaks::use_measured(&rt) {
        Some(p) => println!("roofline: {:.1} TFLOP/s, {:.2} TB/s measured on this GPU by `natsl bench peaks` ({})", p.tflops, p.tbps, p.date),
        None => println!(
            "note: no peaks measured on this GPU (run `natsl bench peaks`): the roofline uses the built-in H200 constants, {} TFLOP/s and {} TB/s",
            bench::PEAK_TFLOPS,
            bench::PEAK_TBPS
        ),
    }
    let mut all = Vec::new();
    let families: [(&str, fn(&Runtime, &[String]) -> Result<Vec<Record>, natsl::Error>); 6] = [
        ("router", |rt, f| bench::router::run(rt, &bench::router::shapes_matching(f))),
        ("gdn", |rt, f| Ok(bench::gdn::run(rt, f))),
        ("sparse", |rt, f| Ok(bench::sparse::run(rt, f))),
        ("merge", |rt, f| Ok(bench::merge::run(rt, f))),
        ("layer", |rt, f| Ok(bench::layer::run(rt, f))),
        ("chain", |rt, f| bench::chain::run(rt, f)),
    ];
    for (name, run) in families {
        if family == name || family == "all" {
            let recs = run(&rt, &filters)?;
            let path = bench::write_results(name, &recs)?;
            println!("results: {}", path.display());
            if plot {
                draw(&path, &recs, &peer_files)?;
            }
            all.extend(recs);
        }
    }
    bench::print_table(&all);
    Ok(())
}

/// The PNGs of one family's records (beside its results file), with the peers' files.
#[cfg(feature = "plot")]
fn draw(results: &std::path::Path, recs: &[Record], peer_files: &[String]) -> Res {
    let mut peers = Vec::new();
    for f in peer_files {
        let p = bench::plot::read_peers(std::path::Path::new(f)).map_err(|e| format!("--peers {f}: {e}"))?;
        println!("peers: {} records from {f}", p.len());
        peers.extend(p);
    }
    let stem = results.with_extension("");
    let files = bench::plot::draw(&stem, recs, &peers)?;
    if files.is_empty() {
        println!("plot: no shape of these results sweeps a length or batch (nothing drawn)");
    }
    for f in files {
        println!("plot: {}", f.display());
    }
    Ok(())
}

#[cfg(not(feature = "plot"))]
fn draw(_: &std::path::Path, _: &[Record], _: &[String]) -> Res {
    println!("plot: not drawn (built without the `plot` feature)");
    Ok(())
}

fn tune_cmd(args: &[String]) -> Res {
    use natsl::tune::{self, run};
    let mut a = run::Args { models: run::MODELS.to_vec(), families: run::Family::ALL.to_vec(), shapes: run::SHAPES.to_vec(), path: std::path::PathBuf::new(), force: false };
    let mut path = tune::cache_path();
    let mut show = false;
    let mut it = args.iter();
    while let Some(x) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("`{x}` needs a value (see `natsl tune --help`)"));
        match x.as_str() {
            "--model" => {
                let v = val()?;
                a.models = run::MODELS.iter().copied().filter(|m| v == "all" || m.name.to_lowercase().ends_with(&v.to_lowercase())).collect();
                if a.models.is_empty() {
                    return Err(format!("unknown model `{v}` (340m, 760m, all)").into());
                }
            }
            "--family" => {
                let v = val()?;
                a.families = run::Family::ALL.iter().copied().filter(|f| v == "all" || f.name() == v).collect();
                if a.families.is_empty() {
                    return Err(format!("unknown family `{v}` (gdn, sparse, all)").into());
                }
            }
            "--quick" => a.shapes = run::QUICK_SHAPES.to_vec(),
            "--force" => a.force = true,
            "--file" => path = Some(val()?.into()),
            "--show" => show = true,
            other => return Err(format!("unknown argument `{other}` (see `natsl tune --help`)").into()),
        }
    }
    let Some(path) = path else { return Err("no tune cache: NATSL_TUNE_CACHE=off and no --file".into()) };
    if show {
        return show_tune(&path);
    }
    a.path = path;
    let rt = match Runtime::new(0) {
        Ok(rt) => rt,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return Ok(());
        }
    };
    let t0 = std::time::Instant::now();
    let (tuned, skipped) = run::tune(&rt, &a)?;
    println!("{tuned} buckets tuned, {skipped} already tuned, in {:.1} s: {}", t0.elapsed().as_secs_f64(), a.path.display());
    Ok(())
}

fn show_tune(path: &std::path::Path) -> Res {
    use natsl::tune::{store, Entry};
    let entries: Vec<Entry> = match store::load(path) {
        store::Loaded::Missing => {
            println!("{}: no tune cache", path.display());
            return Ok(());
        }
        store::Loaded::Damaged(why) => {
            println!("{}: damaged ({why}); the next `natsl tune` rebuilds it", path.display());
            return Ok(());
        }
        store::Loaded::Ok(v) => v,
    };
    println!("{}: {} entries", path.display(), entries.len());
    for e in &entries {
        let k = &e.key;
        println!("  [{} {} SMs cc {} driver {} {} nvrtc {} natsl {} src {}] {}: {} ({:.4} ms, default {:.4} ms, {})", k.device.gpu, k.device.sm_count, k.device.compute_capability, k.device.driver, k.arch, k.nvrtc, k.natsl, k.source_hash, e.bucket, e.choice, e.ms, e.default_ms, e.date);
    }
    Ok(())
}
