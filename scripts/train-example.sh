#!/usr/bin/env bash
# Both training stages on the bundled example with a tiny random model (CPU, a few minutes):
# stage 1 trains the projector on plain/square captions, stage 2 fine-tunes everything on the
# example mixture starting from the stage-1 projector. Outputs go to out/. The README's step 4
# runs the same commands with binaries on PATH.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
LLAVA_SKIP_PYTHON=1 ./scripts/setup.sh   # no Python packages: none is used here
profile=${PROFILE:-release}
cargo build --profile "$profile" -p llava-data -p llava-trainer
bin=${CARGO_TARGET_DIR:-target}/$([[ $profile == dev ]] && echo debug || echo "$profile")
"$bin/llava-data" build datasets-pretrain.toml
"$bin/llava-data" build datasets.toml
[[ -f out/tiny-model/model.safetensors ]] ||
  "$bin/llava-trainer" init --config trainer/configs/tiny-model.json --output out/tiny-model
# Stage 1: projector only (keys in trainer/configs/pretrain.toml; flags override them).
"$bin/llava-trainer" run --config trainer/configs/pretrain.toml --max-steps ${STAGE1_STEPS:-4}
# Stage 2: all parts, from the stage-1 projector.
"$bin/llava-trainer" run --shards out/example --model out/tiny-model \
  --projector out/runs/stage1/mm_projector.safetensors --output out/runs/stage2 \
  --tunable-parts mm_vision_tower,mm_mlp_adapter,mm_language_model \
  --lr 1e-5 --vision-tower-lr 2e-6 --max-steps ${STAGE2_STEPS:-4} --save-every 2 --save-total-limit 2
ls out/runs/stage2
