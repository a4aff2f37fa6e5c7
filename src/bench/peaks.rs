//! `natsl bench peaks`: the GPU's ceilings, measured once and cached.
//!
//! - Tensor-core rate: a loop of bf16 MMAs on operands that stay on chip (no memory
//!   traffic): `wgmma.mma_async` m64n256k16 from shared memory on the sm_90a path (two
//!   warpgroups per SM), `mma.sync` m16n8k16 from registers everywhere (eight
//!   independent accumulators per warp). The peak is the faster of the two.
//! - Memory rate: a 16-byte-vector device copy over buffers far larger than the L2,
//!   and the driver's `cuMemcpyDtoD` of the same bytes (read + written); the faster.
//!
//! Timed like every benchmark ([`super::time_it`]: warm-up, CUDA-graph replays, median).
//! Cached in `peaks.json` (`$NATSL_PEAKS_CACHE`, else beside the tune cache), keyed by
//! [`DeviceId`] (GPU name, SM count, compute capability, driver): `natsl bench
//! <family>` then takes its roofline from there ([`use_measured`]).

use super::time_it;
use crate::error::{Error, Result};
use crate::tune::{store, DeviceId};
use crate::{jit, Runtime};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::path::PathBuf;

/// The measured ceilings of one GPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Peaks {
    pub device: DeviceId,
    /// max(wgmma, mma.sync) dense bf16, f32 accumulate.
    pub tflops: f64,
    /// max(copy kernel, cuMemcpyDtoD), bytes read + written.
    pub tbps: f64,
    pub mma_sync_tflops: f64,
    pub wgmma_tflops: Option<f64>,
    pub copy_kernel_tbps: f64,
    pub memcpy_tbps: f64,
    pub commit: String,
    pub date: String,
}

/// `$NATSL_PEAKS_CACHE`, else `peaks.json` in natsl's cache folder.
pub fn cache_path() -> Option<PathBuf> {
    match std::env::var("NATSL_PEAKS_CACHE") {
        Ok(v) if v == "off" => None,
        Ok(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => jit::cache_dir().map(|d| d.join("peaks.json")),
    }
}

/// The cached peaks of `dev` among the file's entries (the newest of its key).
pub fn find(entries: &[Peaks], dev: &DeviceId) -> Option<Peaks> {
    entries.iter().rev().find(|p| &p.device == dev).cloned()
}

/// Set the roofline of this process's records from the cached peaks of `rt`'s GPU.
/// Returns them, or `None` (the built-in H200 constants stay) where none are cached.
pub fn use_measured(rt: &Runtime) -> Option<Peaks> {
    let path = cache_path()?;
    let dev = DeviceId::of(rt).ok()?;
    let p = find(&store::load::<Peaks>(&path).entries(), &dev)?;
    super::set_ceilings(p.tflops, p.tbps, true);
    Some(p)
}

/// Measure (or, unless `force`, read from the cache) the peaks of `rt`'s GPU.
pub fn measure_or_cached(rt: &Runtime, force: bool) -> Result<(Peaks, bool)> {
    let dev = DeviceId::of(rt)?;
    let path = cache_path();
    let (mut entries, damaged) = match path.as_ref().map(|p| store::load::<Peaks>(p)) {
        Some(store::Loaded::Ok(v)) => (v, false),
        Some(store::Loaded::Damaged(why)) => {
            println!("peaks cache damaged ({why}): measuring again and rewriting it");
            (Vec::new(), true)
        }
        _ => (Vec::new(), false),
    };
    if !force {
        if let Some(p) = find(&entries, &dev) {
            return Ok((p, true));
        }
    }
    let p = measure(rt, dev)?;
    if let Some(path) = path {
        entries.retain(|e| e.device != p.device);
        entries.push(p.clone());
        store::save(&path, &entries, damaged)?;
        println!("peaks cached in {}", path.display());
    }
    Ok((p, false))
}

const MMA_ACC: usize = 8;
const MMA_ITERS: i32 = 16384;
const WG_ITERS: i32 = 4096;
/// wgmma per commit group (two passes over the 64-wide K panel).
const WG_PER_GROUP: usize = 8;

/// The mma.sync loop (any arch) and the copy kernel.
pub fn source_common() -> String {
    let mut s = String::from(
        "typedef unsigned int u32;\ntypedef unsigned long long u64;\nstruct alignas(16) v4 { u32 x, y, z, w; };\n\
         extern \"C\" __global__ void natsl_peak_copy(const v4* __restrict__ src, v4* __restrict__ dst, u64 n) {\n\
         \x20   u64 stride = (u64)gridDim.x * blockDim.x;\n\
         \x20   for (u64 base = (u64)blockIdx.x * blockDim.x + threadIdx.x; base < n; base += 4 * stride) {\n\
         \x20       v4 a[4];\n\
         #pragma unroll\n\
         \x20       for (int j = 0; j < 4; ++j) if (base + j * stride < n) a[j] = src[base + j * stride];\n\
         #pragma unroll\n\
         \x20       for (int j = 0; j < 4; ++j) if (base + j * stride < n) dst[base + j * stride] = a[j];\n\
         \x20   }\n}\n",
    );
    // mma.sync: MMA_ACC independent m16n8k16 accumulators per warp, operands in registers.
    writeln!(s, "extern \"C\" __global__ void natsl_peak_mma(float* out, int iters, u32 seed) {{").unwrap();
    writeln!(s, "    u32 h = seed ^ (threadIdx.x * 0x9e3779b9u) ^ (blockIdx.x * 0x85ebca6bu);").unwrap();
    writeln!(s, "    u32 a[4], b[2];").unwrap();
    writeln!(s, "    for (int i = 0; i < 4; ++i) {{ h = h * 1664525u + 1013904223u; a[i] = (h & 0x007f007fu) | 0x3c003c00u; }}").unwrap();
    writeln!(s, "    for (int i = 0; i < 2; ++i) {{ h = h * 1664525u + 1013904223u; b[i] = (h & 0x007f007fu) | 0x3c003c00u; }}").unwrap();
    writeln!(s, "    float d[{MMA_ACC}][4];").unwrap();
    writeln!(s, "    for (int j = 0; j < {MMA_ACC}; ++j) for (int e = 0; e < 4; ++e) d[j][e] = 0.f;").unwrap();
    writeln!(s, "    for (int it = 0; it < iters; ++it) {{").unwrap();
    writeln!(s, "#pragma unroll").unwrap();
    writeln!(s, "        for (int j = 0; j < {MMA_ACC}; ++j)").unwrap();
    writeln!(
        s,
        "            asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{%0, %1, %2, %3}}, {{%4, %5, %6, %7}}, {{%8, %9}}, {{%0, %1, %2, %3}};\" \
         : \"+f\"(d[j][0]), \"+f\"(d[j][1]), \"+f\"(d[j][2]), \"+f\"(d[j][3]) : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"r\"(b[0]), \"r\"(b[1]));"
    )
    .unwrap();
    writeln!(s, "    }}").unwrap();
    writeln!(s, "    float t = 0.f;").unwrap();
    writeln!(s, "    for (int j = 0; j < {MMA_ACC}; ++j) for (int e = 0; e < 4; ++e) t += d[j][e];").unwrap();
    writeln!(s, "    if (t == 1234.5f) out[threadIdx.x] = t;  // never true: keeps the loop").unwrap();
    writeln!(s, "}}").unwrap();
    s
}

/// The wgmma loop (sm_90a): per CTA two warpgroups, each with its own 64 x 64 A tile and
/// a shared 256 x 64 B tile (bf16, 128-byte swizzled, K-major) in shared memory.
pub fn source_wgmma() -> String {
    let mut s = String::from("typedef unsigned int u32;\ntypedef unsigned long long u64;\n");
    let regs: Vec<String> = (0..128).map(|i| format!("%{i}")).collect();
    let outs: Vec<String> = (0..128).map(|i| format!("\"+f\"(d[{i}])")).collect();
    writeln!(s, "__device__ __forceinline__ void wgmma_256(float* d, u64 da, u64 db) {{").unwrap();
    writeln!(
        s,
        "    asm volatile(\"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %130, 0;\\nwgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {{{}}}, %128, %129, p, 1, 1, 0, 0;\\n}}\\n\" : {} : \"l\"(da), \"l\"(db), \"r\"(1));",
        regs.join(", "),
        outs.join(", ")
    )
    .unwrap();
    writeln!(s, "}}").unwrap();
    s.push_str(
        "__device__ __forceinline__ u64 desc(u32 saddr) {\n\
         \x20   return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);\n}\n\
         extern \"C\" __global__ void __launch_bounds__(256, 1) natsl_peak_wgmma(float* out, int iters, u32 seed) {\n\
         \x20   __shared__ alignas(1024) unsigned short sa[2][64 * 64];\n\
         \x20   __shared__ alignas(1024) unsigned short sb[256 * 64];\n\
         \x20   u32 h = seed ^ (threadIdx.x * 0x9e3779b9u);\n\
         \x20   for (int i = threadIdx.x; i < 2 * 64 * 64; i += blockDim.x) { h = h * 1664525u + 1013904223u; (&sa[0][0])[i] = (unsigned short)((h & 0x7f) | 0x3c00); }\n\
         \x20   for (int i = threadIdx.x; i < 256 * 64; i += blockDim.x) { h = h * 1664525u + 1013904223u; sb[i] = (unsigned short)((h & 0x7f) | 0x3c00); }\n\
         \x20   asm volatile(\"fence.proxy.async.shared::cta;\\n\" ::: \"memory\");\n\
         \x20   __syncthreads();\n\
         \x20   const int wg = threadIdx.x / 128;\n\
         \x20   const u64 da = desc((u32)__cvta_generic_to_shared(&sa[wg][0]));\n\
         \x20   const u64 db = desc((u32)__cvta_generic_to_shared(&sb[0]));\n\
         \x20   float d[128];\n\
         \x20   for (int i = 0; i < 128; ++i) d[i] = 0.f;\n\
         \x20   asm volatile(\"wgmma.fence.sync.aligned;\\n\" ::: \"memory\");\n\
         \x20   for (int it = 0; it < iters; ++it) {\n\
         #pragma unroll\n",
    );
    writeln!(s, "        for (int k = 0; k < {WG_PER_GROUP}; ++k) wgmma_256(d, da + 2 * (k & 3), db + 2 * (k & 3));").unwrap();
    s.push_str(
        "        asm volatile(\"wgmma.commit_group.sync.aligned;\\n\" ::: \"memory\");\n\
         \x20       asm volatile(\"wgmma.wait_group.sync.aligned 1;\\n\" ::: \"memory\");\n\
         \x20   }\n\
         \x20   asm volatile(\"wgmma.wait_group.sync.aligned 0;\\n\" ::: \"memory\");\n\
         \x20   float t = 0.f;\n\
         \x20   for (int i = 0; i < 128; ++i) t += d[i];\n\
         \x20   if (t == 1234.5f) out[threadIdx.x] = t;  // never true: keeps the loop\n}\n",
    );
    s
}

fn load(rt: &Runtime, name: &str, source: &str, target: &str) -> Result<std::sync::Arc<cudarc::driver::CudaModule>> {
    let img = jit::compile_uncached(name, source, &jit::options_for_target(target))?;
    Ok(rt.context().load_module(cudarc::nvrtc::Ptx::from_binary(img.cubin))?)
}

/// Measure every ceiling of `rt`'s GPU (seconds).
pub fn measure(rt: &Runtime, device: DeviceId) -> Result<Peaks> {
    let s = rt.stream();
    let sm = rt.sm_count();
    let common = load(rt, "natsl_peaks", &source_common(), rt.target())?;
    let mut out = s.alloc_zeros::<f32>(256)?;
    let seed = 0x1234_5678u32;

    // mma.sync: 4 CTAs of 8 warps per SM.
    let f = common.load_function("natsl_peak_mma")?;
    let grid = 4 * sm;
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let tm = time_it(rt, 2, 5, |_| {
        // SAFETY: the kernel writes at most out[0..256) (never, in practice).
        unsafe { s.launch_builder(&f).arg(&mut out).arg(&MMA_ITERS).arg(&seed).launch(cfg) }?;
        Ok(())
    })?;
    let flops = grid as f64 * 8.0 * MMA_ITERS as f64 * MMA_ACC as f64 * (2.0 * 16.0 * 8.0 * 16.0);
    let mma_sync_tflops = flops / (tm.median_ms * 1e-3) / 1e12;
    println!("  mma.sync m16n8k16 bf16:   {mma_sync_tflops:7.1} TFLOP/s ({:.3} ms a launch)", tm.median_ms);

    // wgmma (sm_90a): one CTA of two warpgroups per SM.
    let wgmma_tflops = if rt.arch() == natsl_codegen::Arch::Sm90a {
        let r = (|| -> Result<f64> {
            let m = load(rt, "natsl_peaks_wgmma", &source_wgmma(), "sm_90a")?;
            let f = m.load_function("natsl_peak_wgmma")?;
            let cfg = LaunchConfig { grid_dim: (sm, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let tm = time_it(rt, 2, 5, |_| {
                // SAFETY: as above.
                unsafe { s.launch_builder(&f).arg(&mut out).arg(&WG_ITERS).arg(&seed).launch(cfg) }?;
                Ok(())
            })?;
            let flops = sm as f64 * 2.0 * WG_ITERS as f64 * WG_PER_GROUP as f64 * (2.0 * 64.0 * 256.0 * 16.0);
            let t = flops / (tm.median_ms * 1e-3) / 1e12;
            println!("  wgmma m64n256k16 bf16:    {t:7.1} TFLOP/s ({:.3} ms a launch)", tm.median_ms);
            Ok(t)
        })();
        match r {
            Ok(t) => Some(t),
            Err(e) => {
                println!("  wgmma loop failed ({e}): the mma.sync rate is the peak");
                None
            }
        }
    } else {
        None
    };

    // Copy: 16-byte vectors, 8 CTAs of 256 threads per SM, 2 x 1 GiB (far past the L2).
    let bytes: usize = 1 << 30;
    let n = bytes / 16;
    let src = s.alloc_zeros::<u8>(bytes)?;
    let mut dst = s.alloc_zeros::<u8>(bytes)?;
    let f = common.load_function("natsl_peak_copy")?;
    let cfg = LaunchConfig { grid_dim: (8 * sm, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let n64 = n as u64;
    let tm = time_it(rt, 2, 10, |_| {
        // SAFETY: src and dst hold n 16-byte vectors each (cudarc allocations are 256-byte aligned).
        unsafe { s.launch_builder(&f).arg(&src).arg(&mut dst).arg(&n64).launch(cfg) }?;
        Ok(())
    })?;
    let copy_kernel_tbps = 2.0 * bytes as f64 / (tm.median_ms * 1e-3) / 1e12;
    println!("  copy kernel (16 B vectors): {copy_kernel_tbps:5.2} TB/s ({:.3} ms for 2 x 1 GiB)", tm.median_ms);
    let tm = time_it(rt, 2, 10, |_| {
        s.memcpy_dtod(&src, &mut dst)?;
        Ok(())
    })?;
    let memcpy_tbps = 2.0 * bytes as f64 / (tm.median_ms * 1e-3) / 1e12;
    println!("  cuMemcpyDtoD:               {memcpy_tbps:5.2} TB/s ({:.3} ms)", tm.median_ms);

    let tflops = wgmma_tflops.unwrap_or(0.0).max(mma_sync_tflops);
    let tbps = copy_kernel_tbps.max(memcpy_tbps);
    if !(tflops.is_finite() && tflops > 0.0 && tbps.is_finite() && tbps > 0.0) {
        return Err(Error::Unsupported(format!("peaks measured as {tflops} TFLOP/s, {tbps} TB/s")));
    }
    Ok(Peaks { device, tflops, tbps, mma_sync_tflops, wgmma_tflops, copy_kernel_tbps, memcpy_tbps, commit: env!("NATSL_COMMIT").into(), date: super::today() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(gpu: &str, driver: i32) -> DeviceId {
        DeviceId { gpu: gpu.into(), sm_count: 132, compute_capability: "9.0".into(), driver }
    }

    fn peaks(d: DeviceId, tflops: f64) -> Peaks {
        Peaks { device: d, tflops, tbps: 4.3, mma_sync_tflops: 600.0, wgmma_tflops: Some(tflops), copy_kernel_tbps: 4.3, memcpy_tbps: 4.0, commit: "x".into(), date: "2026-12-05".into() }
    }

    #[test]
    fn peaks_are_found_only_for_their_own_device() {
        let (a, b) = (dev("NVIDIA H200", 13000), dev("NVIDIA H200", 12080));
        let entries = vec![peaks(a.clone(), 780.0), peaks(dev("NVIDIA H100 80GB HBM3", 13000), 700.0)];
        assert_eq!(find(&entries, &a).map(|p| p.tflops), Some(780.0));
        // Another driver is another key.
        assert!(find(&entries, &b).is_none());
        let dir = std::env::temp_dir().join(format!("natsl-peaks-test-{}", std::process::id()));
        let path = dir.join("peaks.json");
        store::save(&path, &entries, false).unwrap();
        assert_eq!(store::load::<Peaks>(&path).entries(), entries);
        std::fs::write(&path, b"{\"format\": 1, \"entries\": [{\"device\": 1}]}").unwrap();
        assert!(matches!(store::load::<Peaks>(&path), store::Loaded::Damaged(_)));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The peak kernels compile for both code paths wherever NVRTC is installed (the
    /// CI's NVRTC tier: NATSL_REQUIRE_NVRTC=1 makes a missing NVRTC a failure).
    #[test]
    fn peak_kernels_compile() {
        if jit::nvrtc_version().is_err() {
            assert!(std::env::var_os("NATSL_REQUIRE_NVRTC").is_none(), "NVRTC required but not found");
            println!("skipped: NVRTC not found");
            return;
        }
        for target in ["sm_80", "sm_90a"] {
            let img = jit::compile_uncached("natsl_peaks", &source_common(), &jit::options_for_target(target)).unwrap();
            let reps = jit::parse_ptxas(&img.log);
            assert!(reps.iter().all(|r| r.spill_stores == 0), "{target}: {reps:?}");
        }
        let img = jit::compile_uncached("natsl_peaks_wgmma", &source_wgmma(), &jit::options_for_target("sm_90a")).unwrap();
        let reps = jit::parse_ptxas(&img.log);
        assert!(reps.iter().all(|r| r.spill_stores == 0 && r.registers <= 255), "{reps:?}\n{}", img.log);
    }
}
