//! NVRTC compilation of generated units, with an on-disk cache.
//!
//! Cache entries are keyed by sha256(source, options, NVRTC version, arch) and
//! written to a unique temporary file, then renamed into place: two processes
//! writing at once leave one whole entry, never a torn one. Each entry carries
//! its payload's length and sha256; an entry that fails the check is compiled
//! again and replaced, never loaded.

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

const CACHE_MAGIC: &[u8; 8] = b"NATSLC01";

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
pub fn options_for_target(target: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={target}"),
        "--std=c++17".into(),
        "--device-as-default-execution-space".into(),
        "--ptxas-options=-v".into(),
        "-DNATSL_NVRTC=1".into(),
    ]
}

/// Compile a unit to a cubin for `target` (e.g. `sm_90a`), through the on-disk cache.
pub fn compile(unit: &Unit, target: &str) -> Result<Image> {
    let opts = options_for_target(target);
    let ver = nvrtc_version()?;
    let key = cache_key(&unit.source, &opts, ver, target);
    let dir = cache_dir();
    if let Some(dir) = &dir {
        if let Some(cubin) = read_entry(&dir.join(format!("{key}.cubin"))) {
            return Ok(Image { cubin, log: String::new() });
        }
    }
    let img = compile_uncached(&unit.name, &unit.source, &opts)?;
    if let Some(dir) = &dir {
        // A cache that cannot be written is not an error: the image is still good.
        let _ = write_entry(dir, &key, &img.cubin);
    }
    Ok(img)
}

/// Compile without the cache (the NVRTC test tier uses this to read ptxas' report).
pub fn compile_uncached(name: &str, source: &str, opts: &[String]) -> Result<Image> {
    ensure_nvrtc()?;
    let src = CString::new(source).map_err(|_| Error::Compile { name: name.into(), log: "NUL in source".into() })?;
    let cname = CString::new(format!("{name}.cu")).unwrap();
    let mut prog: nv::nvrtcProgram = std::ptr::null_mut();
    let r = unsafe { nv::nvrtcCreateProgram(&mut prog, src.as_ptr(), cname.as_ptr(), 0, std::ptr::null(), std::ptr::null()) };
    if r != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Compile { name: name.into(), log: format!("nvrtcCreateProgram: {r:?}") });
    }
    let copts: Vec<CString> = opts.iter().map(|o| CString::new(o.as_str()).unwrap()).collect();
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

/// Read a cache entry; `None` if missing, truncated or corrupt.
pub fn read_entry(path: &Path) -> Option<Vec<u8>> {
    let data = std::fs::read(path).ok()?;
    if data.len() < 48 || &data[..8] != CACHE_MAGIC {
        return None;
    }
    let len = u64::from_le_bytes(data[8..16].try_into().ok()?) as usize;
    let payload = data.get(48..)?;
    if payload.len() != len || Sha256::digest(payload).as_slice() != &data[16..48] {
        return None;
    }
    Some(payload.to_vec())
}

/// Write a cache entry atomically (unique temp file, then rename).
pub fn write_entry(dir: &Path, key: &str, payload: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut data = Vec::with_capacity(48 + payload.len());
    data.extend_from_slice(CACHE_MAGIC);
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
