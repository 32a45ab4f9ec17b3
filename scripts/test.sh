#!/usr/bin/env bash
# The test command of the README (and of CI): setup, format check, every test of the workspace.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
./scripts/setup.sh
cargo fmt --all -- --check
cargo test --workspace --locked "$@"
