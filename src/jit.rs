//! NVRTC compilation of generated units, with an on-disk cache.
//!
//! Cache entries are keyed by sha256(source, options, NVRTC version, arch) and
//! written to a unique temporary file, then renamed into place: two processes
//! writing at once leave one whole entry, never a torn one. Each entry records its
//! key and its payload's length and sha256; an entry that fails the check (or was
//! copied under another key's name) is compiled again and replaced, never loaded.
//! Only regular files of at most [`MAX_ENTRY_BYTES`] are read (a FIFO or device
//! node in the cache directory is skipped, not opened for a blocking read). An
//! entry that passes the check but whose image the driver refuses is evicted and
//! compiled again ([`compile_and_load`]). Temporary files left by a writer that
//! died are removed by the next write.

use crate::error::{Error, Result};
use cudarc::nvrtc::sys as nv;
use natsl_codegen::{Arch, Unit};
use sha2::{Digest, Sha256};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A compiled kernel image (cubin) and the compiler's log.
#[derive(Clone, Debug)]
pub struct Image {
    pub cubin: Vec<u8>,
    /// NVRTC + ptxas log (`-Xptxas -v`): registers, shared memory, spills. Empty when cached.
    pub log: String,
}

/// Resource usage parsed from a ptxas `-v` log, per entry point.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PtxasReport {
    pub function: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_frame: u32,
    pub smem: u32,
}

const CACHE_MAGIC: &[u8; 8] = b"NATSLC02";

/// Largest cache entry read or written (the largest shipped image is a few MB).
pub const MAX_ENTRY_BYTES: u64 = 256 << 20;

/// Temporary files older than this are a dead writer's (a write takes milliseconds).
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(600);

/// The NVRTC major version this build loads (`libnvrtc.so.12` or `.13`): that of
/// the selected `cuda-*` feature, so that images match the driver API cudarc binds.
pub const NVRTC_MAJOR: i32 = if cfg!(feature = "cuda-12080") { 12 } else { 13 };

/// The pip wheel that ships this build's NVRTC (for error messages and docs).
pub const NVRTC_PIP: &str = if NVRTC_MAJOR == 12 { "nvidia-cuda-nvrtc-cu12==12.8.93" } else { "nvidia-cuda-nvrtc==13.0.88" };

fn dlopen_global(path: &Path) -> bool {
    // SAFETY: loading NVRTC runs only its initialisers; the handle is leaked so the
    // library stays loaded for the life of the process.
    match unsafe { libloading::os::unix::Library::open(Some(path), libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL) } {
        Ok(lib) => {
            std::mem::forget(lib);
            true
        }
        Err(_) => false,
    }
}

/// Make NVRTC loadable: if the system loader cannot find `libnvrtc.so.<NVRTC_MAJOR>`,
/// look in the places pip and the CUDA toolkit put it and pre-load it by full path,
/// so that cudarc's later `dlopen` finds it by soname. A loaded NVRTC of another
/// major (cudarc also tries other sonames) is refused by [`nvrtc_version`].
pub fn ensure_nvrtc() -> Result<()> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            // The soname first (LD_LIBRARY_PATH, an already loaded copy), so that
            // cudarc's own search, which tries `libnvrtc.so` and other majors, finds this one.
            let soname = PathBuf::from(format!("libnvrtc.so.{NVRTC_MAJOR}"));
            let _found = dlopen_global(&soname)
                || nvrtc_candidates().into_iter().filter(|c| c.is_file()).any(|cand| {
                    // NVRTC dlopens its builtins by soname at compile time: pre-load them too.
                    if let Some(b) = cand.parent().and_then(builtins_in) {
                        dlopen_global(&b);
                    }
                    dlopen_global(&cand)
                });
            // SAFETY: only dlopens NVRTC (cudarc's own search when nothing was pre-loaded).
            if unsafe { nv::is_culib_present() } {
                return Ok(());
            }
            Err(format!(
                "libnvrtc.so.{NVRTC_MAJOR} not found: install it with `pip install {NVRTC_PIP}`, \
                 or put the CUDA toolkit's lib64 on LD_LIBRARY_PATH, or set NATSL_NVRTC to the library's path"
            ))
        })
        .clone()
        .map_err(Error::NvrtcUnavailable)
}

/// `libnvrtc-builtins.so.<major>.<minor>` next to NVRTC (its minor varies by release).
fn builtins_in(dir: &Path) -> Option<PathBuf> {
    let prefix = format!("libnvrtc-builtins.so.{NVRTC_MAJOR}.");
    std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix)))
}

fn nvrtc_candidates() -> Vec<PathBuf> {
    let lib = format!("libnvrtc.so.{NVRTC_MAJOR}");
    let mut v = Vec::new();
    if let Ok(p) = std::env::var("NATSL_NVRTC") {
        v.push(PathBuf::from(p));
    }
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Ok(p) = std::env::var(var) {
            v.push(Path::new(&p).join("lib64").join(&lib));
        }
    }
    v.push(Path::new("/usr/local/cuda/lib64").join(&lib));
    // pip wheels: nvidia-cuda-nvrtc 13.x -> <site-packages>/nvidia/cu13/lib/libnvrtc.so.13,
    // nvidia-cuda-nvrtc-cu12 -> <site-packages>/nvidia/cuda_nvrtc/lib/libnvrtc.so.12.
    let wheel_dir = if NVRTC_MAJOR == 12 { "site-packages/nvidia/cuda_nvrtc/lib" } else { "site-packages/nvidia/cu13/lib" };
    let mut roots = Vec::new();
    if let Ok(p) = std::env::var("VIRTUAL_ENV") {
        roots.push(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("CARGO_MANIFEST_DIR") {
        roots.push(Path::new(&p).join(".venv"));
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd.join(".venv"));
    }
    if let Ok(h) = std::env::var("HOME") {
        roots.push(Path::new(&h).join(".local"));
    }
    for root in roots {
        if let Ok(rd) = std::fs::read_dir(root.join("lib")) {
            for e in rd.flatten() {
                v.push(e.path().join(wheel_dir).join(&lib));
            }
        }
    }
    v
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut a, mut b) = (0, 0);
    let r = unsafe { nv::nvrtcVersion(&mut a, &mut b) };
    if r != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::NvrtcUnavailable(format!("nvrtcVersion: {r:?}")));
    }
    if a != NVRTC_MAJOR {
        return Err(Error::NvrtcUnavailable(format!("loaded NVRTC {a}.{b}, but this build (feature cuda-{NVRTC_MAJOR}...) needs NVRTC {NVRTC_MAJOR}.x: install `{NVRTC_PIP}` or set NATSL_NVRTC")));
    }
    Ok((a, b))
}

/// The options a unit of `arch`'s code path is compiled with for its own target.
pub fn options(arch: Arch) -> Vec<String> {
    options_for_target(arch.nvrtc_arch())
}

/// The options for a real target such as `sm_90a` or `sm_90`. A cubin runs only
/// on its own major architecture, so the `sm_80` code path is compiled for the
/// device at hand (e.g. `sm_90` on an H200).
///
/// `NATSL_NVRTC_DEFINES` (whitespace-separated `NAME=VALUE`) adds `-D` options: a
/// developer's hook for A/B builds of one kernel in one device call (part of the cache
/// key, as every option is). Shipped code has no such macros outside an experiment.
pub fn options_for_target(target: &str) -> Vec<String> {
    let mut v = vec![
        format!("--gpu-architecture={target}"),
        "--std=c++17".into(),
        "--device-as-default-execution-space".into(),
        "--ptxas-options=-v".into(),
        "-DNATSL_NVRTC=1".into(),
    ];
    if let Ok(d) = std::env::var("NATSL_NVRTC_DEFINES") {
        v.extend(d.split_whitespace().filter(|x| !x.contains('\0')).map(|x| format!("-D{x}")));
    }
    v
}

/// Compile a unit to a cubin for `target` (e.g. `sm_90a`), through the on-disk cache.
pub fn compile(unit: &Unit, target: &str) -> Result<Image> {
    let (cubin, log) = cached(cache_dir().as_deref(), unit, target, &mut |c: &[u8]| Ok(c.to_vec()))?;
    Ok(Image { cubin, log })
}

/// Compile a unit for `target` through the on-disk cache and hand the image to `load`
/// (e.g. the driver's module loader). A cached image that `load` refuses is evicted
/// and compiled again; only an image that loaded is written to the cache.
pub fn compile_and_load<T>(unit: &Unit, target: &str, mut load: impl FnMut(&[u8]) -> Result<T>) -> Result<T> {
    Ok(cached(cache_dir().as_deref(), unit, target, &mut load)?.0)
}

/// [`compile_and_load`] with the cache in `dir` (`None`: no disk cache). For tests.
#[doc(hidden)]
pub fn compile_and_load_in<T>(dir: Option<&Path>, unit: &Unit, target: &str, mut load: impl FnMut(&[u8]) -> Result<T>) -> Result<T> {
    Ok(cached(dir, unit, target, &mut load)?.0)
}

/// The cache entry of `unit` for `target` under `dir` (it may not exist).
pub fn entry_path(dir: &Path, unit: &Unit, target: &str) -> Result<PathBuf> {
    let key = cache_key(&unit.source, &options_for_target(target), nvrtc_version()?, target);
    Ok(dir.join(format!("{key}.cubin")))
}

fn cached<T>(dir: Option<&Path>, unit: &Unit, target: &str, load: &mut dyn FnMut(&[u8]) -> Result<T>) -> Result<(T, String)> {
    let opts = options_for_target(target);
    let key = cache_key(&unit.source, &opts, nvrtc_version()?, target);
    if let Some(dir) = dir {
        let path = dir.join(format!("{key}.cubin"));
        if let Some(cubin) = read_entry(&path) {
            match load(&cubin) {
                Ok(v) => return Ok((v, String::new())),
                // The checksum held but the image is unusable (written by a broken
                // build, or for another driver): drop it and compile again.
                Err(_) => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
    let img = compile_uncached(&unit.name, &unit.source, &opts)?;
    let v = load(&img.cubin)?;
    if let Some(dir) = dir {
        // A cache that cannot be written is not an error: the image is still good.
        let _ = write_entry(dir, &key, &img.cubin);
    }
    Ok((v, img.log))
}

/// Compile without the cache (the NVRTC test tier uses this to read ptxas' report).
/// A NUL byte in the name, the source or an option is an `InvalidArgument`.
pub fn compile_uncached(name: &str, source: &str, opts: &[String]) -> Result<Image> {
    let src = CString::new(source).map_err(|_| Error::invalid("source", format!("unit {name}: contains a NUL byte")))?;
    let cname = CString::new(format!("{name}.cu")).map_err(|_| Error::invalid("name", format!("{name:?} contains a NUL byte")))?;
    let copts: Vec<CString> = opts
        .iter()
        .map(|o| CString::new(o.as_str()).map_err(|_| Error::invalid("opts", format!("option {o:?} contains a NUL byte"))))
        .collect::<Result<_>>()?;
    if copts.len() > i32::MAX as usize {
        return Err(Error::invalid("opts", "too many options"));
    }
    ensure_nvrtc()?;
    let mut prog: nv::nvrtcProgram = std::ptr::null_mut();
    let r = unsafe { nv::nvrtcCreateProgram(&mut prog, src.as_ptr(), cname.as_ptr(), 0, std::ptr::null(), std::ptr::null()) };
    if r != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Compile { name: name.into(), log: format!("nvrtcCreateProgram: {r:?}") });
    }
    let ptrs: Vec<*const std::ffi::c_char> = copts.iter().map(|c| c.as_ptr()).collect();
    let r = unsafe { nv::nvrtcCompileProgram(prog, ptrs.len() as i32, ptrs.as_ptr()) };
    let log = unsafe { program_log(prog) };
    let result = if r != nv::nvrtcResult::NVRTC_SUCCESS {
        Err(Error::Compile { name: name.into(), log: format!("{r:?}\n{log}") })
    } else {
        let mut size = 0usize;
        let mut cubin = Vec::new();
        let r1 = unsafe { nv::nvrtcGetCUBINSize(prog, &mut size) };
        if r1 == nv::nvrtcResult::NVRTC_SUCCESS {
            cubin = vec![0u8; size];
            let r2 = unsafe { nv::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _) };
            if r2 != nv::nvrtcResult::NVRTC_SUCCESS {
                cubin.clear();
            }
        }
        if cubin.is_empty() {
            Err(Error::Compile { name: name.into(), log: format!("no cubin produced\n{log}") })
        } else {
            Ok(Image { cubin, log })
        }
    };
    unsafe { nv::nvrtcDestroyProgram(&mut prog) };
    result
}

/// # Safety
/// `prog` must be a live NVRTC program.
unsafe fn program_log(prog: nv::nvrtcProgram) -> String {
    let mut size = 0usize;
    if nv::nvrtcGetProgramLogSize(prog, &mut size) != nv::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    if nv::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut _) != nv::nvrtcResult::NVRTC_SUCCESS {
        return String::new();
    }
    CStr::from_bytes_until_nul(&buf).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Parse ptxas `-v` lines into one report per function.
pub fn parse_ptxas(log: &str) -> Vec<PtxasReport> {
    let mut out: Vec<PtxasReport> = Vec::new();
    let num = |s: &str, key: &str| -> Option<u32> {
        let i = s.find(key)?;
        s[..i].trim_end().rsplit(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let f = rest.split('\'').next().unwrap_or("").to_string();
            out.push(PtxasReport { function: f, ..Default::default() });
        } else if let Some(cur) = out.last_mut() {
            if line.contains("bytes stack frame") {
                cur.stack_frame = num(line, "bytes stack frame").unwrap_or(0);
                cur.spill_stores = num(line, "bytes spill stores").unwrap_or(0);
                cur.spill_loads = num(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                cur.registers = num(line, "registers").unwrap_or(0);
                cur.smem = num(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

fn cache_key(source: &str, opts: &[String], ver: (i32, i32), target: &str) -> String {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    for o in opts {
        h.update([0u8]);
        h.update(o.as_bytes());
    }
    h.update(format!("\0nvrtc {}.{}\0{target}", ver.0, ver.1).as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `$NATSL_CACHE_DIR`, else `$XDG_CACHE_HOME/natsl`, else `~/.cache/natsl`.
/// `NATSL_CACHE_DIR=off` disables the disk cache.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var("NATSL_CACHE_DIR") {
        Ok(v) if v == "off" => None,
        Ok(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => std::env::var("XDG_CACHE_HOME")
            .ok()
            .filter(|s| !s.is_empty())
            .map(|x| Path::new(&x).join("natsl"))
            .or_else(|| std::env::var("HOME").ok().map(|h| Path::new(&h).join(".cache/natsl"))),
    }
}

/// Read a cache entry; `None` if missing, not a regular file, larger than
/// [`MAX_ENTRY_BYTES`], truncated, corrupt, or recorded under another key than its
/// file name (`<key>.cubin`).
pub fn read_entry(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let key = path.file_stem()?.to_str()?;
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_ENTRY_BYTES {
        return None;
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_ENTRY_BYTES + 1).read_to_end(&mut data).ok()?;
    parse_entry(&data, key)
}

/// Layout: magic | key length (u16 LE) | key | payload length (u64 LE) | sha256(payload) | payload.
fn parse_entry(data: &[u8], key: &str) -> Option<Vec<u8>> {
    let rest = data.strip_prefix(CACHE_MAGIC)?;
    let klen = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let (recorded, rest) = rest.get(2..)?.split_at_checked(klen)?;
    if recorded != key.as_bytes() {
        return None;
    }
    let len = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let digest = rest.get(8..40)?;
    let payload = rest.get(40..)?;
    if payload.len() as u64 != len || Sha256::digest(payload).as_slice() != digest {
        return None;
    }
    Some(payload.to_vec())
}

/// Write a cache entry atomically (unique temp file, then rename), and remove the
/// temporary files that writers which died left behind.
pub fn write_entry(dir: &Path, key: &str, payload: &[u8]) -> std::io::Result<PathBuf> {
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
    if key.is_empty() || key.len() > 255 || key.contains(['/', '\0']) || key.starts_with('.') {
        return Err(invalid("cache key must be a plain file name of 1..=255 bytes"));
    }
    if payload.len() as u64 + 8 + 2 + key.len() as u64 + 40 > MAX_ENTRY_BYTES {
        return Err(invalid("image larger than MAX_ENTRY_BYTES"));
    }
    std::fs::create_dir_all(dir)?;
    remove_stale_temp_files(dir);
    let mut data = Vec::with_capacity(58 + key.len() + payload.len());
    data.extend_from_slice(CACHE_MAGIC);
    data.extend_from_slice(&(key.len() as u16).to_le_bytes());
    data.extend_from_slice(key.as_bytes());
    data.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    data.extend_from_slice(&Sha256::digest(payload));
    data.extend_from_slice(payload);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = dir.join(format!(".{key}.{}.{nanos}.tmp", std::process::id()));
    std::fs::write(&tmp, &data)?;
    let dst = dir.join(format!("{key}.cubin"));
    std::fs::rename(&tmp, &dst).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(dst)
}

/// Remove `.<key>.<pid>.<nanos>.tmp` files not modified for [`STALE_TMP`]. Removing a
/// live writer's file (a writer stalled that long) only makes its rename fail,
/// which costs that writer its cache entry, nothing else.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let now = std::time::SystemTime::now();
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with('.') && name.ends_with(".tmp")) {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        let old = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).is_some_and(|age| age > STALE_TMP);
        if meta.is_file() && old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
