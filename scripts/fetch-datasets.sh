#!/usr/bin/env bash
# Fetches the public datasets ftbench uses into a folder of your choice:
#
#   DIR/gsm8k/train.jsonl          7,473 rows   (openai/grade-school-math, MIT)
#   DIR/gsm8k/test.jsonl           1,319 rows
#   DIR/gsm8k/LICENSE
#   DIR/tinyshakespeare/input.txt  40,000 lines (karpathy/char-rnn, public-domain text)
#
# Usage: scripts/fetch-datasets.sh DIR
#
# Files already present with the expected line count are kept. Each file is downloaded to a
# temporary name, its line count checked, and only then renamed into place, so an
# interrupted run leaves no half-written dataset behind. Needs curl or wget.
#
# Then point the config at the copy, e.g. `data.train_path = "DIR/gsm8k/train.jsonl"`
# (see datasets/gsm8k.md and datasets/tinyshakespeare.md).
#
# Mirrors: GSM8K_BASE_URL and SHAKESPEARE_URL override the sources below.

set -euo pipefail

GSM8K_BASE_URL="${GSM8K_BASE_URL:-https://raw.githubusercontent.com/openai/grade-school-math/master}"
SHAKESPEARE_URL="${SHAKESPEARE_URL:-https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt}"

usage() {
    echo "usage: $0 DIR" >&2
    echo "fetches GSM8K and tiny shakespeare into DIR/gsm8k and DIR/tinyshakespeare" >&2
}

if [[ $# -ne 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -eq 1 ]] && exit 0
    exit 2
fi
dest="$1"

if command -v curl >/dev/null 2>&1; then
    download() { curl --fail --silent --show-error --location --retry 3 --output "$2" "$1"; }
elif command -v wget >/dev/null 2>&1; then
    download() { wget --quiet --tries=3 --output-document="$2" "$1"; }
else
    echo "error: neither curl nor wget is installed" >&2
    exit 1
fi

# Lines in a file, counting a last line without a newline too.
count_lines() {
    grep -c '' "$1" || true
}

# The download in progress, removed if the script stops before it is checked and renamed.
partial=""
cleanup() {
    if [[ -n "$partial" ]]; then
        rm -f "$partial"
    fi
}
trap cleanup EXIT

# fetch URL FILE EXPECTED_LINES (an empty count accepts any non-empty file)
fetch() {
    local url="$1" file="$2" want="$3" got
    if [[ -s "$file" ]]; then
        got="$(count_lines "$file")"
        if [[ -z "$want" || "$got" == "$want" ]]; then
            echo "ok       $file ($got lines, already present)"
            return 0
        fi
        echo "refetch  $file (has $got lines, expected $want)"
    fi
    mkdir -p "$(dirname "$file")"
    partial="$(mktemp "$file.partial.XXXXXX")"
    echo "fetch    $url"
    if ! download "$url" "$partial"; then
        echo "error: download failed: $url" >&2
        exit 1
    fi
    got="$(count_lines "$partial")"
    if [[ ! -s "$partial" ]]; then
        echo "error: $url is empty; not saved" >&2
        exit 1
    fi
    if [[ -n "$want" && "$got" != "$want" ]]; then
        echo "error: $url has $got lines, expected $want; not saved" >&2
        exit 1
    fi
    chmod 644 "$partial"
    mv -f "$partial" "$file"
    partial=""
    echo "ok       $file ($got lines)"
}

fetch "$GSM8K_BASE_URL/grade_school_math/data/train.jsonl" "$dest/gsm8k/train.jsonl" 7473
fetch "$GSM8K_BASE_URL/grade_school_math/data/test.jsonl" "$dest/gsm8k/test.jsonl" 1319
fetch "$GSM8K_BASE_URL/LICENSE" "$dest/gsm8k/LICENSE" ""
fetch "$SHAKESPEARE_URL" "$dest/tinyshakespeare/input.txt" 40000

# A GSM8K row must be a JSON object with `question` and `answer`.
if ! head -n 1 "$dest/gsm8k/train.jsonl" | grep -q '"question".*"answer"'; then
    echo "error: $dest/gsm8k/train.jsonl does not look like GSM8K (no question/answer keys)" >&2
    exit 1
fi

echo "done: datasets in $dest"
echo "config: data.train_path = \"$dest/gsm8k/train.jsonl\""
