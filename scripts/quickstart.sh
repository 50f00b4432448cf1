#!/usr/bin/env bash
# The main job in one command: fetch Gemma 3 270M if absent, build in release mode, run
# configs/quickstart.toml (LoRA on GSM8K, evaluation before and after) and print where the
# results are. Extra arguments go to `ftbench train`, e.g. --set train.steps=10.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/fetch-model.sh
if [ ! -f ../shared/datasets/gsm8k/train.jsonl ] && [ $# -eq 0 ]; then
  echo "error: GSM8K not found at ../shared/datasets/gsm8k; fetch it with scripts/fetch-datasets.sh DIR" >&2
  echo "and run: scripts/quickstart.sh --set data.train_path=DIR/gsm8k/train.jsonl --set data.eval_path=DIR/gsm8k/test.jsonl --set eval.gsm8k_path=DIR/gsm8k/test.jsonl" >&2
  exit 1
fi
cargo build --release -p ftbench-cli
exec target/release/ftbench train --config configs/quickstart.toml "$@"
