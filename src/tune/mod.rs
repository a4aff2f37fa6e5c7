//! Tuned kernel choices per GPU: the cache `natsl tune` writes and the one hook the
//! ops' `Auto` choices consult.
//!
//! An entry records the GPU and software it was measured on ([`TuneKey`]: GPU name,
//! SM count, compute capability, driver, code path, NVRTC version, crate version and
//! a hash of the kernel sources), a shape bucket (`gdn_prefill bf16 dk128 dv256 hqk6
//! hv6 n1 t32768`, see the `*_bucket` functions) and the fastest configuration found
//! ([`Choice`]). A call whose shape falls in a bucket of the running GPU's key uses the
//! entry (one log line per bucket and process); entries of any other key stay in the
//! file for their own GPU and are never applied; without an entry the built-in
//! heuristics decide. A tuned choice that cannot run a particular call (e.g. a fused
//! prefill over a view no TMA map describes) is dropped for that call, so a cache can
//! never make a valid call fail.
//!
//! The file is `$NATSL_TUNE_CACHE` (`off`: no lookups), else `tune.json` in natsl's
//! cache folder ([`crate::jit::cache_dir`]). A damaged file is ignored by calls and
//! rebuilt by the next `natsl tune` ([`store`]).

pub mod store;
#[doc(hidden)]
pub mod run;

use crate::error::Result;
use crate::ops::gdn::{GdnOptions, GdnPrefillInputs, GdnPrefillOutputs, PrefillVariant, ScanParallel, ScanTile};
use crate::ops::sparse::PrefillKernel;
use crate::runtime::Runtime;
use natsl_codegen::Arch;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The GPU a measurement belongs to (the key of `natsl bench peaks`' cache).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceId {
    pub gpu: String,
    pub sm_count: u32,
    /// Compute capability, e.g. "9.0".
    pub compute_capability: String,
    /// `cuDriverGetVersion`, e.g. 13000.
    pub driver: i32,
}

impl DeviceId {
    /// The device of `rt`.
    pub fn of(rt: &Runtime) -> Result<DeviceId> {
        let ctx = rt.context();
        let (ma, mi) = ctx.compute_capability()?;
        let mut driver = 0i32;
        // SAFETY: writes one int; the driver is loaded (a runtime exists).
        let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
        if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            driver = -1;
        }
        Ok(DeviceId { gpu: ctx.name()?, sm_count: rt.sm_count(), compute_capability: format!("{ma}.{mi}"), driver })
    }
}

/// Everything a tuned choice depends on besides the shape: an entry applies only
/// where every field is equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TuneKey {
    #[serde(flatten)]
    pub device: DeviceId,
    /// The code path (`sm_90a`, or `sm_80` also on a Hopper forced to it).
    pub arch: String,
    /// NVRTC major.minor that compiled the kernels.
    pub nvrtc: String,
    /// natsl's crate version.
    pub natsl: String,
    /// [`source_hash`]: the kernel templates and the code generator.
    pub source_hash: String,
}

impl TuneKey {
    /// The key of `rt`'s device and code path with this build and the loaded NVRTC.
    pub fn of(rt: &Runtime) -> Result<TuneKey> {
        let (a, b) = crate::jit::nvrtc_version()?;
        Ok(TuneKey { device: DeviceId::of(rt)?, arch: arch_name(rt.arch()).into(), nvrtc: format!("{a}.{b}"), natsl: env!("CARGO_PKG_VERSION").into(), source_hash: source_hash().into() })
    }
}

pub fn arch_name(a: Arch) -> &'static str {
    match a {
        Arch::Sm90a => "sm_90a",
        Arch::Sm80 => "sm_80",
    }
}

/// sha256 (first 16 hex digits) over every embedded CUDA template (path and text) and
/// the generated unit of every shipped spec: any change to a kernel's source or to
/// what the generator makes of it gives another hash, so its tuned entries go stale.
pub fn source_hash() -> &'static str {
    static H: OnceLock<String> = OnceLock::new();
    H.get_or_init(|| {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut paths: Vec<&str> = natsl_codegen::emit::template_paths().collect();
        paths.sort();
        for p in paths {
            h.update(p.as_bytes());
            h.update([0]);
            h.update(natsl_codegen::emit::template(p).unwrap_or("").as_bytes());
            h.update([0]);
        }
        for s in natsl_codegen::catalog::shipped() {
            if let Ok(u) = natsl_codegen::emit(&s) {
                h.update(u.source.as_bytes());
            }
        }
        h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
    })
}

/// The fastest configuration of one bucket. Names, not the ops' enums, so that a file
/// written by another build parses (an unknown name is an entry this build ignores).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum Choice {
    /// `PrefillVariant`: tile (`auto`, `wide`, `reg`, `fused`), cp (`auto`, `off`, `cp8`).
    GdnPrefill { tile: String, cp: String },
    /// `PrefillKernel`: `mma_sync`, `wgmma`, `warp_specialized`.
    SparsePrefill { kernel: String },
}

impl Choice {
    pub fn gdn(v: PrefillVariant) -> Choice {
        let tile = match v.tile {
            ScanTile::Auto => "auto".into(),
            ScanTile::Wide => "wide".into(),
            ScanTile::Reg => "reg".into(),
            ScanTile::Fused => "fused".into(),
            ScanTile::FusedSplitProfile => "profile".into(),
        };
        let cp = match v.cp {
            ScanParallel::Auto => "auto".into(),
            ScanParallel::Off => "off".into(),
            ScanParallel::Segments(s) => format!("cp{s}"),
        };
        Choice::GdnPrefill { tile, cp }
    }

    /// The variant of a GDN choice (`None`: not one, or a name this build lacks).
    pub fn gdn_variant(&self) -> Option<PrefillVariant> {
        let Choice::GdnPrefill { tile, cp } = self else { return None };
        let tile = match tile.as_str() {
            "auto" => ScanTile::Auto,
            "wide" => ScanTile::Wide,
            "reg" => ScanTile::Reg,
            "fused" => ScanTile::Fused,
            _ => return None,
        };
        let cp = match cp.as_str() {
            "auto" => ScanParallel::Auto,
            "off" => ScanParallel::Off,
            c => ScanParallel::Segments(c.strip_prefix("cp")?.parse().ok()?),
        };
        Some(PrefillVariant { tile, cp, part: None })
    }

    pub fn sparse(k: PrefillKernel) -> Choice {
        let kernel = match k {
            PrefillKernel::Auto => "auto",
            PrefillKernel::MmaSync => "mma_sync",
            PrefillKernel::Wgmma => "wgmma",
            PrefillKernel::WarpSpecialized => "warp_specialized",
        };
        Choice::SparsePrefill { kernel: kernel.into() }
    }

    pub fn sparse_kernel(&self) -> Option<PrefillKernel> {
        let Choice::SparsePrefill { kernel } = self else { return None };
        Some(match kernel.as_str() {
            "auto" => PrefillKernel::Auto,
            "mma_sync" => PrefillKernel::MmaSync,
            "wgmma" => PrefillKernel::Wgmma,
            "warp_specialized" => PrefillKernel::WarpSpecialized,
            _ => return None,
        })
    }

    /// Whether this build understands the choice.
    pub fn known(&self) -> bool {
        self.gdn_variant().is_some() || self.sparse_kernel().is_some()
    }
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Choice::GdnPrefill { tile, cp } => write!(f, "tile {tile}, cp {cp}"),
            Choice::SparsePrefill { kernel } => write!(f, "kernel {kernel}"),
        }
    }
}

/// One tuned bucket, as kept in the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub key: TuneKey,
    pub bucket: String,
    pub choice: Choice,
    /// Median time of the choice and of the heuristic default at the tuned shape (ms).
    pub ms: f64,
    pub default_ms: f64,
    /// Candidates timed (that ran and agreed with the default's output).
    pub candidates: usize,
    /// The shape that was timed (a bucket's representative).
    pub shape: String,
    pub date: String,
}

/// The entries of one key: what calls on that GPU consult.
#[derive(Clone, Debug, Default)]
pub struct Table {
    map: HashMap<String, Choice>,
    /// Entries of other GPUs / drivers / versions in the same file (ignored).
    pub foreign: usize,
    /// Entries of this key with a choice this build does not know (ignored).
    pub unknown: usize,
}

impl Table {
    /// The entries of `key` among `entries` (the last one of a bucket wins).
    pub fn for_key(key: &TuneKey, entries: &[Entry]) -> Table {
        let mut t = Table::default();
        for e in entries {
            if &e.key != key {
                t.foreign += 1;
            } else if !e.choice.known() {
                t.unknown += 1;
            } else {
                t.map.insert(e.bucket.clone(), e.choice.clone());
            }
        }
        t
    }
    pub fn get(&self, bucket: &str) -> Option<&Choice> {
        self.map.get(bucket)
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The cache file (`None`: `NATSL_TUNE_CACHE=off`, or no cache folder).
pub fn cache_path() -> Option<PathBuf> {
    match std::env::var("NATSL_TUNE_CACHE") {
        Ok(v) if v == "off" => None,
        Ok(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => crate::jit::cache_dir().map(|d| d.join("tune.json")),
    }
}

/// Upsert `new` into `entries`: an entry of the same key and bucket is replaced,
/// every other entry (other buckets, other GPUs) kept.
pub fn upsert(entries: &mut Vec<Entry>, new: Entry) {
    entries.retain(|e| !(e.key == new.key && e.bucket == new.bucket));
    entries.push(new);
}

// ---- shape buckets: pure functions of what a call knows on the host ----

/// Lengths and counts round up to a power of two (lengths at least one chunk).
pub fn len_bucket(len: usize) -> usize {
    len.max(crate::CHUNK).next_power_of_two()
}
pub fn count_bucket(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

fn seq_stats(cu_seqlens: &[i32]) -> (usize, usize, usize) {
    let n = cu_seqlens.len().saturating_sub(1);
    let max = cu_seqlens.windows(2).map(|w| (w[1] - w[0]).max(0) as usize).max().unwrap_or(0);
    let total = cu_seqlens.last().copied().unwrap_or(0).max(0) as usize;
    (n, max, total)
}

fn dt(d: natsl_codegen::DType) -> &'static str {
    match d {
        natsl_codegen::DType::Bf16 => "bf16",
        natsl_codegen::DType::F16 => "f16",
    }
}

/// GDN prefill: dtype, head dims and counts, sequences and the longest one.
pub fn gdn_bucket(dtype: natsl_codegen::DType, dk: usize, dv: usize, hqk: usize, hv: usize, cu_seqlens: &[i32]) -> String {
    let (n, max, _) = seq_stats(cu_seqlens);
    format!("gdn_prefill {} dk{dk} dv{dv} hqk{hqk} hv{hv} n{} t{}", dt(dtype), count_bucket(n), len_bucket(max))
}

/// Sparse prefill: dtype, head dims and counts, the mask kind, sequences and the longest one.
#[allow(clippy::too_many_arguments)]
pub fn sparse_bucket(dtype: natsl_codegen::DType, dk: usize, dv: usize, hq: usize, hkv: usize, routed: bool, cu_seqlens: &[i32]) -> String {
    let (n, max, _) = seq_stats(cu_seqlens);
    format!("sparse_prefill {} dk{dk} dv{dv} hq{hq} hkv{hkv} {} n{} t{}", dt(dtype), if routed { "routed" } else { "blocks" }, count_bucket(n), len_bucket(max))
}


// ---- the hook: one table per (device, code path), loaded on first use ----

static BYPASS: AtomicBool = AtomicBool::new(false);

type Tables = Mutex<HashMap<(usize, Arch), Option<Arc<Table>>>>;

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(Default::default)
}

fn logged() -> &'static Mutex<HashSet<String>> {
    static L: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    L.get_or_init(Default::default)
}

/// While set, calls ignore the cache (the tuner times the heuristic default so).
pub fn set_bypass(on: bool) {
    BYPASS.store(on, Ordering::SeqCst);
}

/// Forget the loaded tables: the next call reads the file again.
pub fn reload() {
    tables().lock().unwrap_or_else(|p| p.into_inner()).clear();
    logged().lock().unwrap_or_else(|p| p.into_inner()).clear();
}

fn load_table(rt: &Runtime) -> Option<Arc<Table>> {
    let path = cache_path()?;
    let entries: Vec<Entry> = match store::load(&path) {
        store::Loaded::Missing => return None,
        store::Loaded::Ok(v) => v,
        store::Loaded::Damaged(why) => {
            eprintln!("natsl: tune cache {} is damaged ({why}): ignored, the heuristics decide (`natsl tune` rebuilds it)", path.display());
            return None;
        }
    };
    let key = TuneKey::of(rt).ok()?;
    let t = Table::for_key(&key, &entries);
    if t.is_empty() {
        return None;
    }
    Some(Arc::new(t))
}

/// The tuned choice of `bucket` on `rt`'s device, if any (logs its first use).
fn lookup(rt: &Runtime, bucket: impl FnOnce() -> String) -> Option<Choice> {
    if BYPASS.load(Ordering::Relaxed) {
        return None;
    }
    let table = {
        let id = (rt.context().ordinal(), rt.arch());
        let mut m = tables().lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id).or_insert_with(|| load_table(rt)).clone()?
    };
    let b = bucket();
    let c = table.get(&b)?.clone();
    if logged().lock().unwrap_or_else(|p| p.into_inner()).insert(b.clone()) {
        eprintln!("natsl: tuned choice for `{b}`: {c}");
    }
    Some(c)
}

/// The hook of `gdn_prefill` (and its workspace size): the tuned variant of the call's
/// bucket where it can run this call, else the default (the heuristics).
pub(crate) fn gdn_prefill(rt: &Runtime, cu_seqlens: &[i32], inp: &GdnPrefillInputs, out: &GdnPrefillOutputs, opts: &GdnOptions) -> PrefillVariant {
    let tuned = lookup(rt, || {
        let (q, v) = (inp.q.shape(), inp.v.shape());
        let dtype = inp.q.dtype().activation().unwrap_or(natsl_codegen::DType::Bf16);
        gdn_bucket(dtype, q.get(2).copied().unwrap_or(0), v.get(2).copied().unwrap_or(0), q.get(1).copied().unwrap_or(0), v.get(1).copied().unwrap_or(0), cu_seqlens)
    })
    .and_then(|c| c.gdn_variant());
    let Some(v) = tuned else { return PrefillVariant::default() };
    let fused = matches!(v.tile, ScanTile::Fused);
    let tma_ok = || ["q", "k", "v"].iter().zip([&inp.q, &inp.k, &inp.v]).all(|(a, t)| crate::tma::encode_thd(a, t, crate::CHUNK as u32).is_ok());
    let plan_ok = crate::ops::gdn::prefill_workspace_bytes_variant(rt.arch(), rt.sm_count(), cu_seqlens, inp, out, opts, v).is_ok();
    if plan_ok && (!fused || tma_ok()) {
        v
    } else {
        PrefillVariant::default()
    }
}

/// The hook of the sparse prefill under `PrefillKernel::Auto`: the tuned kernel, or
/// `Auto` (the caller still checks that a warp-specialized choice has its TMA maps).
pub(crate) fn sparse_prefill(rt: &Runtime, plan: &crate::ops::sparse::PrefillPlan, cu_seqlens: &[i32], routed: bool) -> PrefillKernel {
    let k = lookup(rt, || sparse_bucket(plan.dtype, plan.dims.dk as usize, plan.dims.dv as usize, plan.hq, plan.hkv, routed, cu_seqlens)).and_then(|c| c.sparse_kernel());
    match k {
        Some(PrefillKernel::WarpSpecialized) if !routed => PrefillKernel::Auto,
        Some(PrefillKernel::Wgmma | PrefillKernel::WarpSpecialized) if rt.arch() != Arch::Sm90a => PrefillKernel::Auto,
        Some(k) => k,
        None => PrefillKernel::Auto,
    }
}


#[cfg(test)]
mod tests;
