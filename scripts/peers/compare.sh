#!/usr/bin/env bash
# Runs ftbench's training-step benchmark and the PyTorch + PEFT peer with the same shape and
# threads, one after the other, and prints both JSON lines and a third with the ratio
# peer s/step ÷ ftbench s/step (above 1: ftbench is faster).
#
#   scripts/peers/compare.sh PRESET [STEPS]
#
# Environment (defaults in brackets): THREADS [all cores], MODE [lora], BATCH [4], SEQ [256],
# LAYERS [the preset's], PEER_DTYPE [f32; or bf16-autocast], PEER_ATTN [eager],
# VENV [.venv-peers, made by scripts/peers/setup.sh], FTBENCH [target/release/ftbench; an MKL
# build is target/mkl/release/ftbench, made by scripts/build-mkl.sh], FTBENCH_ARGS [none; more
# `bench train` flags for ftbench only, e.g. "--base-dtype bf16"].
# Run it on an otherwise idle machine: the two runs are only comparable when nothing else
# competes for the cores.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: scripts/peers/compare.sh PRESET [STEPS]   (PRESET: smollm-135m, gemma3-270m, llama-3.2-1b)" >&2
    exit 2
fi
preset="$1"
steps="${2:-5}"
threads="${THREADS:-$(nproc)}"
mode="${MODE:-lora}"
batch="${BATCH:-4}"
seq="${SEQ:-256}"
venv="${VENV:-$root/.venv-peers}"
ftbench="${FTBENCH:-$root/target/release/ftbench}"

if [ ! -x "$ftbench" ]; then
    echo "compare.sh: $ftbench not found; build it with: cargo build --release -p ftbench-cli (or scripts/build-mkl.sh for target/mkl/release/ftbench)" >&2
    exit 1
fi
if [ "$mode" != lora ] && [ "$mode" != full ]; then
    echo "compare.sh: MODE=$mode: the peer runs lora or full" >&2
    exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "compare.sh: no Python environment at $venv; make it with: scripts/peers/setup.sh" >&2
    exit 1
fi

common=(--preset "$preset" --mode "$mode" --batch "$batch" --seq "$seq" --steps "$steps" --threads "$threads")
if [ -n "${LAYERS:-}" ]; then
    common+=(--layers "$LAYERS")
fi

echo "ftbench: ${common[*]} ${FTBENCH_ARGS:-}" >&2
# shellcheck disable=SC2086 # FTBENCH_ARGS is split into flags on purpose
ours="$("$ftbench" bench train "${common[@]}" ${FTBENCH_ARGS:-})"
echo "$ours"

echo "peer: ${common[*]} --dtype ${PEER_DTYPE:-f32} --attn ${PEER_ATTN:-eager}" >&2
peer="$("$venv/bin/python" "$here/peft_lora_step.py" "${common[@]}" --dtype "${PEER_DTYPE:-f32}" --attn "${PEER_ATTN:-eager}")"
echo "$peer"

"$venv/bin/python" - "$ours" "$peer" <<'PY'
import json, sys

ours, peer = (json.loads(s) for s in sys.argv[1:3])
for key in ("preset", "mode", "layers", "batch", "seq", "threads", "trainable_parameters"):
    if ours.get(key) != peer.get(key):
        sys.exit(f"compare.sh: the runs differ in {key}: ftbench {ours.get(key)!r}, peer {peer.get(key)!r}")
ratio = peer["median_s_per_step"] / ours["median_s_per_step"]
summary = {
    "compare": "train",
    "preset": ours["preset"],
    "mode": ours["mode"],
    "threads": ours["threads"],
    "ftbench_dtype": ours["dtype"],
    "ftbench_base_format": ours.get("base_format"),
    "ftbench_cpu_gemm": ours.get("cpu_gemm"),
    "peer_dtype": peer["dtype"],
    "ftbench_median_s_per_step": ours["median_s_per_step"],
    "peer_median_s_per_step": peer["median_s_per_step"],
    "ratio_peer_over_ftbench": ratio,
    # the same work per token, so ftbench's FLOP count applies to the peer too
    "peer_achieved_gflops_per_s": ours["flops_per_token"] * peer["tokens_per_s"] / 1e9,
    "ftbench_achieved_gflops_per_s": ours["achieved_gflops_per_s"],
}
print(json.dumps(summary))
verdict = "ftbench is faster" if ratio > 1 else "the peer is faster" if ratio < 1 else "a tie"
print(f"peer s/step / ftbench s/step = {ratio:.3f} ({verdict})", file=sys.stderr)
PY
