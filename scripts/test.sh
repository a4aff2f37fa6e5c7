#!/usr/bin/env bash
# The test command. On a fresh machine it installs what it needs: NVRTC and
# ptxas/nvcc 13.0 from PyPI into ./.venv (13.0 because the H200's driver refuses
# images from a newer NVRTC), then runs every tier:
#   1. CPU: the f64 reference, the code generator, argument validation, the disk cache
#   2. NVRTC: every shipped specialisation compiles for sm_80 and sm_90a without spills
#   3. GPU: kernels against the reference (each prints `skipped: no CUDA device` here)
# and finally builds the `aot` feature with the pip nvcc and checks it embedded the images.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS="nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.88"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check $PKGS
CU=$(echo "$PWD"/.venv/lib/python3*/site-packages/nvidia/cu13)
export LD_LIBRARY_PATH="$CU/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NATSL_REQUIRE_NVRTC=1
export NATSL_CACHE_DIR="$PWD/target/natsl-cache"

cargo test --release --workspace

# Ahead-of-time images: compiled by nvcc at build time, embedded, listed at run time.
NVCC="$CU/bin/nvcc" PATH="$CU/bin:$PATH" cargo test --release --features aot --test aot
