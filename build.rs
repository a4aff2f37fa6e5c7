//! Build script. Always writes `$OUT_DIR/aot.rs` (the table of embedded images).
//! With the `aot` feature and nvcc on the machine (PATH, $CUDA_PATH/bin or
//! $NVCC), every shipped specialisation is compiled to a cubin and embedded;
//! otherwise the table is empty and kernels are JIT-compiled through NVRTC.
//! Plain builds need no CUDA toolkit, no GPU and no libclang.

use std::{env, fs, path::PathBuf, process::Command};

fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = env::var("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Ok(p) = env::var(var) {
            let c = PathBuf::from(p).join("bin/nvcc");
            if c.is_file() {
                return Some(c);
            }
        }
    }
    Command::new("nvcc").arg("--version").output().ok().filter(|o| o.status.success()).map(|_| PathBuf::from("nvcc"))
}

fn main() {
    // One CUDA version: cudarc cannot bind two driver APIs at once.
    let cuda: Vec<&str> = ["cuda-12080", "cuda-13000"].into_iter().filter(|f| env::var_os(format!("CARGO_FEATURE_{}", f.to_uppercase().replace('-', "_"))).is_some()).collect();
    if cuda.len() != 1 {
        panic!("natsl: enable exactly one CUDA version feature (cuda-13000, the default, or cuda-12080 with default-features = false); enabled: {cuda:?}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-env-changed=NVCC");
    // The commit, for benchmark records (absent outside a git checkout).
    let commit = Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    println!("cargo:rustc-env=NATSL_COMMIT={}", commit.unwrap_or_else(|| "unknown".into()));
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/logs/HEAD");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let mut table = String::from("pub static IMAGES: &[(&str, &str, &[u8])] = &[\n");
    if env::var_os("CARGO_FEATURE_AOT").is_some() {
        match find_nvcc() {
            None => println!("cargo:warning=natsl: feature `aot` is on but nvcc was not found; every kernel will be JIT-compiled"),
            Some(nvcc) => {
                for spec in natsl_codegen::catalog::shipped() {
                    let unit = natsl_codegen::emit(&spec).expect("codegen");
                    let cu = out.join(format!("{}.cu", unit.name));
                    let cubin = out.join(format!("{}.cubin", unit.name));
                    fs::write(&cu, &unit.source).unwrap();
                    let arch = spec.arch.nvrtc_arch().trim_start_matches("sm_");
                    let status = Command::new(&nvcc)
                        // NVRTC compiles with --device-as-default-execution-space; nvcc needs
                        // relaxed constexpr for the same undecorated constexpr helpers.
                        .args(["-cubin", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-DNATSL_NVRTC=0"])
                        .arg(format!("-gencode=arch=compute_{arch},code=sm_{arch}"))
                        .arg("-o")
                        .arg(&cubin)
                        .arg(&cu)
                        .status();
                    match status {
                        Ok(s) if s.success() => {
                            table.push_str(&format!("    ({:?}, {:?}, include_bytes!({:?})),\n", unit.name, spec.arch.nvrtc_arch(), cubin.display().to_string()));
                        }
                        _ => println!("cargo:warning=natsl: nvcc failed on {}; it will be JIT-compiled", unit.name),
                    }
                }
            }
        }
    }
    table.push_str("];\n");
    fs::write(out.join("aot.rs"), table).unwrap();
}
