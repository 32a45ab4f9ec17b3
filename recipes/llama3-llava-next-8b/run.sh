#!/usr/bin/env bash
# llama3-llava-next-8b end to end: shards → base model → stage 1 (projector) → stage 2 (all).
#
#   NGPU=8 DATA=/data MODELS=/models WORK=/scratch/llava ./recipes/llama3-llava-next-8b/run.sh
#
# Under Slurm (one node), e.g.:
#   sbatch -N1 --gpus-per-node=8 --cpus-per-task=128 --wrap \
#     "NGPU=8 DATA=/data MODELS=/models WORK=/scratch/llava ./recipes/llama3-llava-next-8b/run.sh"
#
# DATA holds LLaVA-Pretrain/ (blip_laion_cc_sbu_558k.json, images/) and LLaVA-NeXT-Data/
# (llava_next_raw_format/...); MODELS holds Meta-Llama-3-8B-Instruct/ and
# clip-vit-large-patch14-336/ as downloaded from the Hub (safetensors or pytorch_model.bin, single or
# sharded). Every step is skipped when its output exists, so a rerun resumes where it stopped
# (training itself resumes from its latest checkpoint).
#
# With NGPU > 1 the ranks talk over NCCL (a `--features cuda` build of llava-trainer). That path is
# compiled and tested on the CPU (launch, rendezvous, failures), not yet run on GPUs.
set -euo pipefail

NGPU=${NGPU:-8}
DATA=${DATA:?set DATA to the datasets root}
MODELS=${MODELS:?set MODELS to the base models root}
WORK=${WORK:-$PWD/llama3-llava-next-8b}
LLM=${LLM:-$MODELS/Meta-Llama-3-8B-Instruct}
VISION=${VISION:-$MODELS/clip-vit-large-patch14-336}
LLAVA_DATA=${LLAVA_DATA:-llava-data}
LLAVA_TRAINER=${LLAVA_TRAINER:-llava-trainer}
TORCHRUN=${TORCHRUN:-torchrun}
RECIPE=$(cd "$(dirname "$0")" && pwd)

# The configs' paths are relative to their folder: copy them into WORK beside data/ and models/.
mkdir -p "$WORK"
cp "$RECIPE"/*.toml "$WORK"/
ln -sfn "$DATA" "$WORK/data"
ln -sfn "$MODELS" "$WORK/models"
cd "$WORK"

step() { echo "== $(date -u +%FT%TZ) $*"; }

[ -f shards/pretrain/manifest.json ] || { step "build stage-1 shards"; "$LLAVA_DATA" build datasets-pretrain.toml; }
[ -f shards/finetune/manifest.json ] || { step "build stage-2 shards"; "$LLAVA_DATA" build datasets-finetune.toml; }
[ -f base-model/config.json ] || {
    step "assemble the base model"
    "$LLAVA_TRAINER" init --llm "$LLM" --vision "$VISION" --output base-model
}

launch() { "$TORCHRUN" --standalone --no-python --nproc-per-node "$NGPU" "$LLAVA_TRAINER" run "$@"; }

[ -f runs/stage1/mm_projector.safetensors ] || { step "stage 1: projector"; launch --config pretrain.toml; }
step "stage 2: vision tower, projector and LLM"
launch --config finetune.toml
step "done: $WORK/runs/stage2/checkpoint-*/ (HF LlavaNextForConditionalGeneration)"
