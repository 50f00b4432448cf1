#!/usr/bin/env bash
# Creates a Python virtual environment with the pinned PyTorch + transformers + PEFT that the
# peer benchmark (peft_lora_step.py) runs on. Packages come from PyPI only.
#
#   scripts/peers/setup.sh [VENV_DIR]     (default: .venv-peers at the repository root)
#   PYTHON=python3.12 scripts/peers/setup.sh
#
# On Linux x86_64 the PyPI torch wheel depends on NVIDIA CUDA runtime wheels, so the download
# is several GB (see scripts/peers/README.md); the benchmark itself runs on the CPU.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$root/.venv-peers}"
python="${PYTHON:-python3}"

TORCH_VERSION=2.15.0
TRANSFORMERS_VERSION=5.25.0
PEFT_VERSION=0.21.2

if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup.sh: $python not found (set PYTHON to a Python 3.11+ interpreter)" >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "setup.sh: $("$python" --version 2>&1) is too old; torch $TORCH_VERSION and transformers $TRANSFORMERS_VERSION need Python 3.11 or newer" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install \
    "torch==$TORCH_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" \
    "peft==$PEFT_VERSION"

"$venv/bin/python" - <<'PY'
import peft, torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
print(f"MKL available: {torch.backends.mkl.is_available()}, oneDNN available: {torch.backends.mkldnn.is_available()}")
PY
echo "peer environment ready: $venv"
echo "run: $venv/bin/python scripts/peers/peft_lora_step.py --preset smollm-135m --steps 3 --threads 2"
