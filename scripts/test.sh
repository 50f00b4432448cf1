#!/usr/bin/env bash
# The test command: every test of the workspace, CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --no-fail-fast "$@"
