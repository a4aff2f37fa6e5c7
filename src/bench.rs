//! Benchmark plumbing shared by `natsl bench`, `cargo run --release` and the
//! criterion benches: CUDA-event timing (warm-up, median), roofline figures
//! and the JSON records kept in bench/results/.

use crate::error::Result;
use crate::runtime::Runtime;
use cudarc::driver::sys::CUevent_flags;
use serde::Serialize;

/// Measured ceilings of the H200 (BENCH.md): dense bf16 GEMM and device copy. The
/// roofline of records uses them until [`peaks::use_measured`] finds this GPU's own.
pub const PEAK_TFLOPS: f64 = 771.0;
pub const PEAK_TBPS: f64 = 4.2;

/// The roofline's ceilings: (TFLOP/s, TB/s, measured on this GPU?).
static CEILINGS: std::sync::RwLock<(f64, f64, bool)> = std::sync::RwLock::new((PEAK_TFLOPS, PEAK_TBPS, false));

/// Set the ceilings the roofline of this process's records uses.
pub fn set_ceilings(tflops: f64, tbps: f64, measured: bool) {
    *CEILINGS.write().unwrap_or_else(|p| p.into_inner()) = (tflops, tbps, measured);
}

/// (TFLOP/s, TB/s, measured on this GPU?) of the roofline in use.
pub fn ceilings() -> (f64, f64, bool) {
    *CEILINGS.read().unwrap_or_else(|p| p.into_inner())
}

/// Median, min and max of event-timed runs, in milliseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub iters: usize,
}

/// Time `f` with CUDA events on the runtime's stream and report the median.
///
/// After `warmup` untimed calls (which also compile and load the kernels), the
/// calls `f(0..REPS)` are captured into one CUDA graph and each of `iters`
/// replays is timed on its own (time per call = replay / REPS): this measures
/// the GPU, not the host's launch path, the way an engine runs natsl (graphs).
/// `f(i)` gets the call number so callers can rotate inputs past the L2. Where
/// capture is refused, the calls are timed one by one instead.
pub fn time_it(rt: &Runtime, warmup: usize, iters: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<Timing> {
    const REPS: usize = 8;
    for i in 0..warmup {
        f(i)?;
    }
    rt.synchronize()?;
    let ctx = rt.context();
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let graph = capture(rt, REPS, &mut f);
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters {
        start.record(rt.stream())?;
        match &graph {
            Some(g) => g.launch()?,
            None => f(warmup + i)?,
        }
        end.record(rt.stream())?;
        end.synchronize()?;
        let ms = start.elapsed_ms(&end)? as f64;
        times.push(if graph.is_some() { ms / REPS as f64 } else { ms });
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(Timing { median_ms: times[times.len() / 2], min_ms: times[0], max_ms: *times.last().unwrap(), iters })
}

/// Capture `f(0..reps)` into a graph; `None` (stream left usable) if the driver refuses.
fn capture(rt: &Runtime, reps: usize, f: &mut impl FnMut(usize) -> Result<()>) -> Option<cudarc::driver::CudaGraph> {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let s = rt.stream();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).ok()?;
    let mut ok = true;
    for i in 0..reps {
        if f(i).is_err() {
            ok = false;
            break;
        }
    }
    let graph = s.end_capture(CUgraphInstantiate_flags(0)).ok().flatten();
    if !ok {
        return None;
    }
    let g = graph?;
    g.launch().ok()?;
    s.synchronize().ok()?;
    Some(g)
}

/// The roofline time of a problem: max(FLOPs / peak, bytes / bandwidth), in ms.
pub fn roofline_ms(flops: f64, bytes: f64) -> f64 {
    let (tf, tb, _) = ceilings();
    (flops / (tf * 1e12)).max(bytes / (tb * 1e12)) * 1e3
}

/// One benchmark result, as kept in bench/results/*.jsonl.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub op: String,
    pub shape: String,
    pub variant: String,
    pub ms: f64,
    pub flops: f64,
    pub bytes: f64,
    pub tflops: f64,
    pub tbps: f64,
    /// roofline time / measured time.
    pub roofline_frac: f64,
    /// The ceilings of that roofline and whether they were measured on this GPU
    /// (`natsl bench peaks`) or are the built-in H200 constants.
    pub peak_tflops: f64,
    pub peak_tbps: f64,
    pub peaks_measured: bool,
    pub gpu: String,
    pub commit: String,
    pub date: String,
}

impl Record {
    pub fn new(rt: &Runtime, op: &str, shape: String, variant: String, t: &Timing, flops: f64, bytes: f64) -> Record {
        let ms = t.median_ms;
        let (peak_tflops, peak_tbps, peaks_measured) = ceilings();
        Record {
            op: op.into(),
            shape,
            variant,
            ms,
            flops,
            bytes,
            tflops: flops / (ms * 1e-3) / 1e12,
            tbps: bytes / (ms * 1e-3) / 1e12,
            roofline_frac: roofline_ms(flops, bytes) / ms,
            peak_tflops,
            peak_tbps,
            peaks_measured,
            gpu: rt.context().name().unwrap_or_default(),
            commit: env!("NATSL_COMMIT").to_string(),
            date: today(),
        }
    }
}

/// UTC date, YYYY-MM-DD, from the system clock (no extra dependency).
pub fn today() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let days = secs.div_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{:02}-{:02}", if m <= 2 { y + 1 } else { y }, m, d)
}

/// Print records as a table.
pub fn print_table(records: &[Record]) {
    println!("{:<14} {:<34} {:<14} {:>10} {:>9} {:>8} {:>9}", "op", "shape", "variant", "time ms", "TFLOP/s", "TB/s", "roofline");
    for r in records {
        println!("{:<14} {:<34} {:<14} {:>10.4} {:>9.1} {:>8.3} {:>8.1}%", r.op, r.shape, r.variant, r.ms, r.tflops, r.tbps, 100.0 * r.roofline_frac);
    }
}

/// Append records as JSON lines to bench/results/<family>-<date>.jsonl (under
/// CARGO_MANIFEST_DIR when set, else the current directory). Returns the path.
pub fn write_results(family: &str, records: &[Record]) -> Result<std::path::PathBuf> {
    use std::io::Write;
    let root = std::env::var("CARGO_MANIFEST_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| std::path::PathBuf::from("."));
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{family}-{}.jsonl", today()));
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    for r in records {
        writeln!(f, "{}", serde_json::to_string(r).unwrap())?;
    }
    Ok(path)
}

/// A device buffer of `n` values in [lo, hi): a random block of 64k repeated, so
/// GB-sized inputs fill quickly and are never zeros.
pub fn fill<T: crate::testing::TestElem>(rt: &Runtime, n: usize, lo: f64, hi: f64, seed: u64) -> cudarc::driver::CudaSlice<T> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let block: Vec<T> = (0..(1 << 16).min(n)).map(|_| T::from_f64(rng.gen_range(lo..hi))).collect();
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let m = (n - v.len()).min(block.len());
        v.extend_from_slice(&block[..m]);
    }
    rt.stream().clone_htod(&v).expect("upload benchmark input")
}

pub mod chain;
pub mod gdn;
pub mod layer;
pub mod merge;
pub mod peaks;
#[cfg(feature = "plot")]
pub mod plot;
pub mod router;
pub mod sparse;
