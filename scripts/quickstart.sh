#!/usr/bin/env bash
# Quick start: the whole flow on the bundled example, on the CPU. Installs what building needs
# (setup.sh --build: no Python packages, no test servers), fetches the tokenizer, builds the debug
# binaries, builds the example mixture (datasets.toml → out/example), prints `llava-data
# inspect`'s summary, trains a tiny random model for two steps (stage 2: every part trains) and
# lists the checkpoint folder it wrote (out/quickstart/run/checkpoint-2). Rerunning it redoes
# nothing that is done. The README's numbered path goes further (stage 1, GPUs, HF transformers).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
./scripts/setup.sh --build
cargo build -p llava-data -p llava-trainer
bin=${CARGO_TARGET_DIR:-target}/debug
out=out/quickstart
show() { printf '\n$ %s\n' "$*"; "$@"; }

show "$bin/llava-data" build datasets.toml
show "$bin/llava-data" inspect out/example
[[ -f $out/tiny-model/model.safetensors ]] ||
  show "$bin/llava-trainer" init --config trainer/configs/tiny-model.json --output "$out/tiny-model"
show "$bin/llava-trainer" run --shards out/example --model "$out/tiny-model" --output "$out/run" \
  --max-steps 2 --device cpu --workers 2
show ls -l "$out/run/checkpoint-2"
cat <<EOF

The checkpoint is an HF LlavaNextForConditionalGeneration folder with its processor and tokenizer
files: README.md, step 7, loads it with transformers. Next: stage 1 + stage 2 (README.md, step 4).
EOF
