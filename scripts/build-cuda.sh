#!/usr/bin/env bash
# Compiles llava-trainer with the `cuda` feature against the tree of scripts/setup-cuda.sh
# (.cache/cuda; LLAVA_CUDA_TREE overrides it). Needs no GPU and no CUDA install.
#
#   scripts/build-cuda.sh                 the CI build: dev profile, every target of the workspace
#   scripts/build-cuda.sh CMD [ARGS...]   runs CMD in the same environment instead, e.g.
#     scripts/build-cuda.sh cargo clippy -p llava-trainer --features cuda --all-targets -- -D warnings
#     scripts/build-cuda.sh cargo build --release -p llava-trainer --features cuda
#
# The CI build uses the dev profile and the whole workspace, as `cargo test --workspace` does, so
# dependencies get the same features and the CPU test build's artifacts are reused: only what the
# feature changes is compiled (cudarc, candle-kernels' nvcc runs, candle-core/-nn, the trainer and
# the end-to-end tests that link it). `-p llava-trainer` would instead resolve features for the
# trainer alone and recompile ~80 shared dependencies. Any compiler warning in our crates fails it.
# The resulting binaries need libcuda.so.1 and NVIDIA's libraries to start: they cannot run here.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tree=${LLAVA_CUDA_TREE:-$root/.cache/cuda}
[[ -x $tree/bin/nvcc && -d $tree/lib/stubs ]] || {
  echo "build-cuda: no CUDA tree at $tree: run scripts/setup-cuda.sh first" >&2
  exit 1
}
# Keep these identical from build to build: candle-kernels and cudarc rerun (minutes) when any changes.
export CUDA_HOME=$tree                      # cudarc's link search: lib/, lib/stubs
export PATH=$tree/bin:$PATH
export NVCC=$tree/bin/nvcc                  # cudaforge (candle-kernels)
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}   # H100/H200; no nvidia-smi here (becomes sm_90a)
export CUDARC_CUDA_VERSION=13000            # CUDA 13.0 driver-API bindings (driver 580)
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}

if (($#)); then
  exec "$@"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$SECONDS
status=0
cargo build --workspace --locked --features llava-trainer/cuda --all-targets 2>&1 |
  tee "$log" || status=$?
if ((status == 0)) && grep -qE '^warning: `[^`]+` \(.*\) generated [0-9]+ warnings?' "$log"; then
  echo "build-cuda: the cuda build has compiler warnings (see above)" >&2
  status=1
fi
echo "build-cuda: $( ((status == 0)) && echo ok || echo FAILED) in $((SECONDS - start)) s"
exit "$status"
