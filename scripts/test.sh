#!/usr/bin/env bash
# The test command. On a fresh machine it installs what it needs: NVRTC and
# ptxas/nvcc 13.0 from PyPI into ./.venv (13.0 because the H200's driver refuses
# images from a newer NVRTC), then runs every tier:
#   1. CPU: the f64 reference, the code generator, argument validation, the disk cache
#   2. NVRTC: every shipped specialisation compiles for sm_80 and sm_90a without spills
#   3. GPU: kernels against the reference (each prints `skipped: no CUDA device` here)
# then the C ABI (a C program built with the system cc runs the validation path), the
# Python ctypes layer (no torch), the CUDA 12 build (feature cuda-12080) with the NVRTC
# tier of the sm_90a units on NVRTC 12.8, and finally the `aot` feature with the pip
# nvcc, checking that it embedded the images.
set -euo pipefail
cd "$(dirname "$0")/.."

# nvidia-cuda-nvrtc-cu12: NVRTC 12.8 for the cuda-12080 build (lands in nvidia/cuda_nvrtc/,
# beside 13.0's nvidia/cu13/; each build loads only its own major).
PKGS="nvidia-cuda-nvrtc-cu12==12.8.93 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.88"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check $PKGS
CU=$(echo "$PWD"/.venv/lib/python3*/site-packages/nvidia/cu13)
export LD_LIBRARY_PATH="$CU/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NATSL_REQUIRE_NVRTC=1
export NATSL_CACHE_DIR="$PWD/target/natsl-cache"

cargo test --release --workspace

# C ABI: include/natsl.h is fresh (capi/tests/header_fresh.rs, above); a C program
# links libnatsl_capi.so and runs the validation path (no GPU needed).
cargo build --release -p natsl-capi
cc -std=c99 -Wall -Wextra -Werror -Iinclude examples/c/validate.c -Ltarget/release -lnatsl_capi \
    -Wl,-rpath,"$PWD/target/release" -o target/natsl_validate_c
./target/natsl_validate_c
# Python: the ctypes layer over the same library (torch is not installed here).
python3 python/tests/test_ctypes_abi.py

# CUDA 12: an engine on cudarc's cuda-12080 builds natsl; NVRTC 12.8 compiles every
# shipped sm_90a unit without spills (those use wgmma and mbarriers, the newest PTX
# natsl emits; the sm_80 units use only mma.sync / cp.async, which 13.0 already covers:
# half the units keeps this step near 2 minutes).
NATSL_NVRTC_ARCH=sm_90a cargo test --release --no-default-features --features cuda-12080 --test nvrtc
# ... and an engine crate on cudarc's cuda-12080 builds against natsl (and runs, skipping without a GPU).
cargo run --release -q --manifest-path examples/engine-cu12/Cargo.toml --target-dir target

# Ahead-of-time images: compiled by nvcc at build time, embedded, listed at run time.
NVCC="$CU/bin/nvcc" PATH="$CU/bin:$PATH" cargo test --release --features aot --test aot
