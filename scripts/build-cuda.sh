#!/usr/bin/env bash
# Builds `ftbench` with `--features cuda` on a machine without a GPU or CUDA install:
# the CUDA 13.0 compiler from PyPI (pinned wheels), link-time stand-ins for the CUDA
# libraries (scripts/cuda-link-stubs.sh), sm_90 kernels unless CUDA_COMPUTE_CAP says
# otherwise. The binary runs on a machine with an NVIDIA driver and the CUDA 13 libraries.
#
# usage: scripts/build-cuda.sh [extra cargo build args]
#   FTBENCH_CUDA_CACHE  where the compiler and the stand-ins go (default ~/.cache/ftbench-cuda)
#   CARGO_TARGET_DIR    default target/cuda (apart from the CPU build's target/)
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${FTBENCH_CUDA_CACHE:-$HOME/.cache/ftbench-cuda}
venv=$cache/venv
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}

# 1. nvcc 13.0. Every wheel pinned: unpinned, pip mixes 13.0 and newer parts, and
#    cudarc 0.19 refuses CUDA newer than 13.4.
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
cuda_home=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
[[ -x $cuda_home/bin/nvcc ]] || { echo "build-cuda: no nvcc under $cuda_home" >&2; exit 1; }

# 2. link-time stand-ins, generated from the bindings of the cudarc version in Cargo.lock
cargo fetch --quiet
cudarc_src=$(cargo metadata --format-version 1 --features ftbench-cli/cuda 2>/dev/null |
  python3 -c 'import json, sys, os
pkgs = json.load(sys.stdin)["packages"]
print(next(os.path.dirname(p["manifest_path"]) for p in pkgs if p["name"] == "cudarc"))')
stubs=$cache/stubs-$(basename "$cudarc_src")
if [[ ! -f $stubs/lib/libcuda.so ]]; then
  scripts/cuda-link-stubs.sh "$cudarc_src" "$stubs/lib"
fi
ln -sf "$cuda_home/lib/libcudart.so.13" "$stubs/lib/libcudart.so"

# 3. build
export CUDA_HOME=$cuda_home CUDA_PATH=$cuda_home CUDA_ROOT=$stubs
export PATH=$cuda_home/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
nvcc --version | tail -2
cargo build --release -p ftbench-cli --features cuda "$@"
echo "built $CARGO_TARGET_DIR/release/ftbench (cuda, compute capability $CUDA_COMPUTE_CAP)"
