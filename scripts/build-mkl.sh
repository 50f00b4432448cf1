#!/usr/bin/env bash
# Builds `ftbench` with `--features mkl`: every f32 CPU product (candle's and the fused LoRA
# layer's) on Intel MKL, and bf16 bases (`model.quantization = "bf16"`) on MKL's bf16 GEMM,
# which uses AMX tiles where the CPU has them. MKL comes from PyPI (pinned wheels) and is
# linked statically: the binary needs no MKL at run time.
#
# usage: scripts/build-mkl.sh [extra cargo args, e.g. test -p ftbench-trainer --lib]
#   FTBENCH_MKL_CACHE  where the wheels go (default ~/.cache/ftbench-mkl; about 1.3 GB)
#   FTBENCH_MKL_TARGET the cargo target folder (default target/mkl, apart from the default
#                      build's target/; CARGO_TARGET_DIR is not used, so that the MKL build
#                      never lands on the default one)
# The first argument may be a cargo command (test, build, run, check, clippy, ...); without one
# the script runs `cargo build --release -p ftbench-cli --features mkl`.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${FTBENCH_MKL_CACHE:-$HOME/.cache/ftbench-mkl}
venv=$cache/venv
export CARGO_TARGET_DIR=${FTBENCH_MKL_TARGET:-target/mkl}

# 1. MKL's static libraries and headers
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  mkl-static==2026.2.0 mkl-include==2026.2.0 intel-openmp==2026.2.0

# 2. an MKLROOT holding only the static libraries, so the link cannot pick a shared one
root=$cache/mklroot
mkdir -p "$root/include" "$root/lib"
for f in mkl.h mkl_version.h; do
  ln -sf "$venv/include/$f" "$root/include/$f"
done
for f in libmkl_intel_lp64.a libmkl_intel_thread.a libmkl_core.a libiomp5.a; do
  [[ -f $venv/lib/$f ]] || { echo "build-mkl: $venv/lib/$f missing after pip install" >&2; exit 1; }
  ln -sf "$venv/lib/$f" "$root/lib/$f"
done
export MKLROOT=$root

# 3. build. intel-mkl-src's build script does not fail when it finds no MKL: it caches a
#    build that then fails to link (undefined sgemm_). MKLROOT is always set here; after a
#    build without it, run `cargo clean -p intel-mkl-src` in this target folder.
if [[ $# -gt 0 && $1 != -* ]]; then
  cmd=$1
  shift
  cargo "$cmd" --release --features ftbench-trainer/mkl "$@"
else
  cargo build --release -p ftbench-cli --features mkl "$@"
  echo "built $CARGO_TARGET_DIR/release/ftbench (mkl)"
fi
