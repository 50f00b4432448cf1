#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU and no Rust toolchain: runs a `ftbench`
# built here with `scripts/build-cuda.sh` and writes results/gpu/<date>-<gpu>.json.
#
#   1. selftest: the fused and naive LoRA layers against an f64 reference (f32, bf16),
#      forward and backward, with and without dropout;
#   2. bench lora-kernel: plain frozen linear, naive and fused LoRA at dims 4096, 5120, 8192,
#      rank 16, tokens 2048, 4096, 8192, bf16 and f32;
#   3. bench train: a Llama-3.2-1B-shaped model (random weights), LoRA, fused and naive,
#      and QLoRA on an NF4 base (fused).
#
# usage: scripts/gpu-check.sh [FTBENCH_BINARY]   (default target/cuda/release/ftbench)
#   The CUDA 13 libraries (libcuda from the driver; libcublas, libcublasLt, libcurand,
#   libnvrtc, libcudart) must be on LD_LIBRARY_PATH, e.g. a PyTorch cu13 install's
#   site-packages/nvidia/cu13/lib. Every step has its own time limit; the whole stays
#   under 10 minutes on an H100/H200-class GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/cuda/release/ftbench}
[[ -x $bin ]] || { echo "gpu-check: $bin not found (build it with scripts/build-cuda.sh)" >&2; exit 1; }
out_dir=results/gpu
mkdir -p "$out_dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
slug=$(echo "${gpu:-unknown-gpu}" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-*$//')
date=$(date -u +%Y%m%d-%H%M%S)
result=$out_dir/$date-$slug.json

# step NAME LIMIT_S COMMAND...: stdout to $work/NAME.out, exit status to $work/NAME.rc
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$work/$name.out" 2>"$work/$name.err"
  echo $? >"$work/$name.rc"
  cat "$work/$name.out"
  tail -3 "$work/$name.err"
}

step selftest 120 "$bin" selftest --device cuda --dtype f32 --dtype bf16 --json "$work/selftest.json"
for dt in bf16 f32; do
  step "lora-kernel-$dt" 150 "$bin" bench lora-kernel --device cuda --dtype "$dt" \
    --dims 4096,5120,8192 --rank 16 --tokens 2048,4096,8192 --reps 10 --json
done
for k in fused naive; do
  step "train-$k" 120 "$bin" bench train --device cuda --preset llama-3.2-1b --mode lora \
    --batch 4 --seq 512 --steps 5 --lora-kernel "$k"
done
step train-qlora-nf4 150 "$bin" bench train --device cuda --preset llama-3.2-1b --mode qlora \
  --quant nf4 --batch 4 --seq 512 --steps 5

python3 - "$work" "$result" "$bin" "$gpu" "$driver" <<'PY'
import json, os, subprocess, sys
work, result, binary, gpu, driver = sys.argv[1:]
def read(name, ext):
    p = os.path.join(work, f"{name}.{ext}")
    return open(p).read() if os.path.exists(p) else ""
def json_lines(name):
    out = []
    for line in read(name, "out").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out
steps = {}
for name in ["selftest", "lora-kernel-bf16", "lora-kernel-f32", "train-fused", "train-naive",
             "train-qlora-nf4"]:
    rc = read(name, "rc").strip()
    steps[name] = {
        "exit_status": int(rc) if rc else None,
        "stderr_tail": read(name, "err").splitlines()[-3:],
    }
steps["selftest"]["checks"] = json.loads(read("selftest", "json") or "null")
for dt in ["bf16", "f32"]:
    steps[f"lora-kernel-{dt}"]["rows"] = json_lines(f"lora-kernel-{dt}")
for k in ["fused", "naive", "qlora-nf4"]:
    steps[f"train-{k}"]["result"] = (json_lines(f"train-{k}") or [None])[-1]
version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
record = {
    "date_utc": os.path.basename(result)[:15],
    "gpu": gpu or None,
    "driver": driver or None,
    "ftbench": version,
    "cuda_runtime_libs": os.environ.get("LD_LIBRARY_PATH", ""),
    "steps": steps,
    "passed": all(s["exit_status"] == 0 for s in steps.values()),
}
tmp = result + ".tmp"
with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
os.replace(tmp, result)
print(f"gpu-check: {'passed' if record['passed'] else 'FAILED'}; wrote {result}")
sys.exit(0 if record["passed"] else 1)
PY
