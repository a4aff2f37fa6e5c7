#!/usr/bin/env bash
# Build the natsl wheel: the C ABI (cargo), copied into the package, then a
# platform wheel into python/dist/. CUDA=12 builds against cudarc's cuda-12080
# (NVRTC 12, for torch's CUDA 12 wheels); the default is CUDA 13.
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURES=()
if [ "${CUDA:-13}" = "12" ]; then FEATURES=(--no-default-features --features cuda-12080); fi
cargo build --release -p natsl-capi "${FEATURES[@]}"
cp target/release/libnatsl_capi.so python/natsl/
cd python
rm -rf build dist
"${PYTHON:-python3}" -m pip wheel -q --no-deps -w dist .
ls dist/*.whl
