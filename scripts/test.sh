#!/usr/bin/env bash
# The test command of the README (and of CI): setup, format check, every test of the workspace,
# the Python package's tests (pytest python/tests in .venv, on the module cargo test built;
# skipped with LLAVA_SKIP_PYTHON=1), clippy with warnings as errors, the CUDA compile check (scripts/setup-cuda.sh +
# scripts/build-cuda.sh; skipped with LLAVA_SKIP_CUDA_BUILD=1), then one summary line over all the
# tests. Fails if the tests, clippy or the CUDA build do.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
./scripts/setup.sh
cargo fmt --all -- --check
# No incremental-compilation caches (target/debug/incremental: hundreds of MB that a one-shot
# test run never reuses); it also lets sccache, when set as RUSTC_WRAPPER, cache our crates.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
if [[ ${LLAVA_SKIP_PYTHON:-0} != 1 ]]; then
  start=$SECONDS
  junit=$(mktemp --suffix .xml)
  py_status=0
  # python/tests imports the extension module cargo test just built (see python/tests/conftest.py).
  "$root/.venv/bin/python" -m pytest -q python/tests --junitxml "$junit" 2>&1 | tee -a "$log" || py_status=$?
  # pytest's counts as one more "test result:" line for the summary (a run without a report counts one failure).
  "$root/.venv/bin/python" - "$junit" "$py_status" <<'PY' | tee -a "$log"
import sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
try:
    for s in ET.parse(sys.argv[1]).getroot().iter("testsuite"):
        n, f, s_ = int(s.get("tests", 0)), int(s.get("failures", 0)) + int(s.get("errors", 0)), int(s.get("skipped", 0))
        passed, failed, skipped = passed + n - f - s_, failed + f, skipped + s_
except Exception:
    pass
if sys.argv[2] != "0" and failed == 0:
    failed = 1
print(f"test result: {'ok' if failed == 0 else 'FAILED'}. {passed} passed; {failed} failed; {skipped} ignored (python/tests)")
PY
  rm -f "$junit"
  echo "python: $((SECONDS - start))s (pytest python/tests)"
  ((py_status == 0)) || status=$py_status
fi
# Lints: every crate and target, warnings are errors (LLAVA_SKIP_CLIPPY=1 skips it locally).
lint="skipped (LLAVA_SKIP_CLIPPY=1)"
if [[ ${LLAVA_SKIP_CLIPPY:-0} != 1 ]]; then
  if cargo clippy --workspace --all-targets --locked -- -D warnings; then lint="ok"; else lint="FAILED"; status=1; fi
fi
echo "clippy: $lint"
# The trainer with `--features cuda` must compile (no GPU needed; it is not run here).
cuda="skipped (LLAVA_SKIP_CUDA_BUILD=1)"
if [[ ${LLAVA_SKIP_CUDA_BUILD:-0} != 1 ]]; then
  cuda_status=0
  { ./scripts/setup-cuda.sh && ./scripts/build-cuda.sh; } || cuda_status=$?
  if ((cuda_status == 0)); then cuda="ok"; else cuda="FAILED (exit $cuda_status)"; status=1; fi
fi
echo "cuda build: $cuda"
# Sum the per-binary "test result:" lines (the last ones cargo prints are empty doc-test runs).
awk '/^test result:/ { for (i = 1; i <= NF; i++) {
        if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
