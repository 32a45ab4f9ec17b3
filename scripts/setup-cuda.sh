#!/usr/bin/env bash
# Installs what `--features cuda` needs to compile on a machine without a GPU or a CUDA install:
# NVIDIA's CUDA 13.0 compiler tree from PyPI wheels, plus link-time-only stub libraries for the
# driver, cuBLAS, cuBLASLt, cuRAND, NVRTC and NCCL, built with gcc from the function lists in
# cudarc's own bindings. Writes .cache/cuda (git-ignored; LLAVA_CUDA_TREE overrides it).
# Idempotent: does nothing when the tree is complete and matches this script's versions.
#
# nvcc stays at 13.0.x: the GPU machines run driver 580 (CUDA 13.0), which JIT-loads PTX up to
# ISA 9.0 only, and candle loads its kernels as PTX (nvcc 13.1+ emits a newer ISA). Every wheel is
# pinned by version and sha256; see ../shared/notes/cuda-build.md §2 for the derivation.
# The stubs are named lib*.so (never lib*.so.N) and return 999 from every function, so they can
# be linked against but are never picked up at run time; never put lib/stubs on a loader path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tree=${LLAVA_CUDA_TREE:-$root/.cache/cuda}

[[ $(uname -sm) == "Linux x86_64" ]] || {
  echo "setup-cuda: the CUDA wheels pinned here are for Linux x86_64, not $(uname -sm)" >&2
  exit 1
}

# name==version sha256 (the manylinux x86_64 wheel of each).
wheels=(
  "nvidia-cuda-nvcc==13.0.88 56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03"
  "nvidia-nvvm==13.0.88 c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0"
  "nvidia-cuda-crt==13.0.88 2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4"
  "nvidia-cuda-cccl==13.0.85 e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649"
  "nvidia-cuda-runtime==13.0.96 7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"
)
# Stub libraries: soname, cudarc bindings file, whether NVIDIA's real library has a symbol-version
# node named after its soname (checked with readelf -V; libcuda and libnccl have none).
stubs=(
  "libcuda.so.1 driver/sys/mod.rs -"
  "libcublas.so.13 cublas/sys/mod.rs v"
  "libcublasLt.so.13 cublaslt/sys/mod.rs v"
  "libcurand.so.10 curand/sys/mod.rs v"
  "libnvrtc.so.13 nvrtc/sys/mod.rs v"
  "libnccl.so.2 nccl/sys/mod.rs -"
)

# The cudarc whose bindings the stubs mirror: the one Cargo.lock resolves.
cudarc=$(awk '$0 == "name = \"cudarc\"" { getline; gsub(/^version = "|"$/, ""); print; exit }' Cargo.lock)
[[ -n $cudarc ]] || { echo "setup-cuda: no cudarc in Cargo.lock" >&2; exit 1; }

stamp="wheels: ${wheels[*]}; stubs: ${stubs[*]}; cudarc $cudarc; layout 1"
if [[ -f $tree/.setup-cuda && $(<"$tree/.setup-cuda") == "$stamp" && -x $tree/bin/nvcc ]]; then
  echo "setup-cuda: $tree is up to date (nvcc 13.0.88, stubs from cudarc $cudarc)"
  exit 0
fi

command -v gcc >/dev/null || { echo "setup-cuda: gcc is needed to build the link stubs" >&2; exit 1; }
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "setup-cuda: installing python3-pip"
  sudo_cmd=""
  [[ $(id -u) -eq 0 ]] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-pip >/dev/null
fi

# cudarc's sources (the bindings) come with `cargo fetch`.
registry=${CARGO_HOME:-$HOME/.cargo}/registry
find_cudarc() { compgen -G "$registry/src/*/cudarc-$cudarc/src" | head -1 || true; }
src=$(find_cudarc)
if [[ -z $src ]]; then
  echo "setup-cuda: fetching crates (cargo fetch --locked) for cudarc $cudarc's bindings"
  cargo fetch --locked
  src=$(find_cudarc)
fi
[[ -n $src ]] || { echo "setup-cuda: cudarc-$cudarc sources not found under $registry/src" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
new=$tree.new.$$
trap 'rm -rf "$work" "$new"' EXIT

echo "setup-cuda: downloading ${#wheels[@]} CUDA 13.0 wheels (~100 MB)"
for w in "${wheels[@]}"; do echo "${w% *} --hash=sha256:${w#* }"; done >"$work/requirements.txt"
python3 -m pip download -q --no-deps --only-binary=:all: --require-hashes \
  -r "$work/requirements.txt" -d "$work/wheels"
mkdir -p "$new"
for whl in "$work"/wheels/*.whl; do
  python3 -m zipfile -e "$whl" "$work/x"
done
cp -a "$work"/x/nvidia/cu13/. "$new"/
chmod +x "$new"/bin/* "$new"/nvvm/bin/*
chmod -x "$new"/bin/nvcc.profile
ln -sf libcudart.so.13 "$new"/lib/libcudart.so

echo "setup-cuda: building link stubs from $src"
mkdir -p "$new"/lib/stubs
for s in "${stubs[@]}"; do
  read -r soname bindings versioned <<<"$s"
  grep -oP '^\s+fn \K\w+(?=\()' "$src/$bindings" | sort -u |
    awk '{ print "int " $1 "(void) { return 999; }" }' >"$work/stub.c"
  [[ -s $work/stub.c ]] || { echo "setup-cuda: no functions in $src/$bindings" >&2; exit 1; }
  vs=()
  if [[ $versioned == v ]]; then
    echo "$soname { global: *; };" >"$work/stub.map"
    vs=(-Wl,--version-script="$work/stub.map")
  fi
  gcc -shared -fPIC -o "$new/lib/stubs/${soname%%.so*}.so" -Wl,-soname,"$soname" "${vs[@]}" "$work/stub.c"
done

"$new"/bin/nvcc --version | grep -q 'V13\.0\.88' || { echo "setup-cuda: nvcc is not 13.0.88" >&2; exit 1; }
echo "$stamp" >"$new/.setup-cuda"
rm -rf "$tree"
mkdir -p "$(dirname "$tree")"
mv "$new" "$tree"
echo "setup-cuda: $tree ready ($(du -sh "$tree" | cut -f1)): $("$tree"/bin/nvcc --version | tail -1)"
