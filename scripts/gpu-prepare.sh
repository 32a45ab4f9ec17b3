#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for scripts/gpu-check.sh on a lent GPU machine, which has no Rust:
# a release `llava-trainer` built with `--features cuda` (compressed with xz -9), the parity
# fixture it checks against, and a manifest. Run it here (no GPU needed); carry `.gpu` with the
# device call. Cold, the release CUDA build takes about 12 min on 2 cores; later runs only relink.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
fixture=fixtures/tiny-llava-next-a
out=.gpu

./scripts/setup-cuda.sh
./scripts/build-cuda.sh cargo build --release --locked -p llava-trainer --features cuda --bin llava-trainer
target=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin=$target/release/llava-trainer

rm -rf "$out.new"
mkdir -p "$out.new/fixture/model"
echo "gpu-prepare: compressing $(du -h "$bin" | cut -f1) binary with xz -9"
xz -9 -T0 -c "$bin" >"$out.new/llava-trainer.xz"
# What `llava-trainer parity` reads (trainer/src/diag/parity.rs): model/, inputs, expected, fixture.json.
cp "$fixture"/{inputs.safetensors,expected.safetensors,fixture.json} "$out.new/fixture/"
cp "$fixture"/model/{config.json,model.safetensors} "$out.new/fixture/model/"
python3 - "$out.new" "$bin" <<'EOF'
import hashlib, json, os, subprocess, sys, time
out, binary = sys.argv[1:]
def sha(p):
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
manifest = {
    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "git_commit": git("rev-parse", "HEAD"),
    "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "binary_sha256": sha(binary),
    "binary_bytes": os.path.getsize(binary),
    "features": ["cuda"],
    "cuda_compute_cap": os.environ.get("CUDA_COMPUTE_CAP", "90"),
    "nvcc": "13.0.88",
}
with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
EOF
rm -rf "$out"
mv "$out.new" "$out"
size=$(du -sb "$out" | cut -f1)
echo "gpu-prepare: $out ready, $((size / 1024 / 1024)) MiB ($(du -h "$out/llava-trainer.xz" | cut -f1) binary)"
if ((size > 56 * 1024 * 1024)); then
  echo "gpu-prepare: warning: a device call carries at most 64 MiB with the working tree" >&2
fi
echo "gpu-prepare: on the device, from the repo root, with carry [\".gpu\"]: scripts/gpu-check.sh"
