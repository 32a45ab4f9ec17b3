#!/usr/bin/env bash
# `llava-data bench` on two image sets, one core: the generated mixture over the bundled images
# (the fixture records with their own images, cycled) and one over the fixtures' real photographs only
# (the list below, from fixtures/images/SOURCES.md; the fixtures' other images are icons,
# screenshots, test patterns and palette art). Every tile encoding at zstd 1, 2 and 3, in one
# run per set. Extra arguments go to both runs (e.g. --json).
# Usage: [RECORDS=1000] [LEVELS=1,2,3] scripts/bench-photos.sh [BIN=target/release/llava-data] [...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$root/target/release/llava-data}
shift || true
photos=(
  coco/train2017/000000352481.png             # chelsea (scikit-image)
  coco/train2017/000000563812.jpg             # pikemen
  coco/train2017/000000041928.gif             # hopper, palette
  gqa/images/2351064.png                      # coins, grey
  gqa/images/2414911.jpg                      # hopper, grey 500x500
  llava/llava_pretrain/images/24724/247245600.jpg   # grace hopper 512x600
  llava/llava_pretrain/images/29073/290733225.jpg   # meadow 1280x1024
  llava/llava_pretrain/images/39677/396779357.webp  # hopper webp
  llava/llava_pretrain/images/47972/479721482.jpg   # hopper 128x128
  sam/images/sa_67233.jpg                     # fish 180x181
)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/photos"
for p in "${photos[@]}"; do
  ln -s "$root/fixtures/images/$p" "$dir/photos/$(echo "$p" | tr / _)"
done
cd "$root"
levels=${LEVELS:-1,2,3}
records=${RECORDS:-1000}
echo "== generated mixture over the bundled images ($records records)"
taskset -c 0 "$bin" bench --records "$records" --threads 1 --levels "$levels" --work "$dir/bundled" "$@"
echo "== generated mixture over the fixtures' photographs (${#photos[@]} images, $records records)"
taskset -c 0 "$bin" bench --images "$dir/photos" --records "$records" --threads 1 \
  --levels "$levels" --work "$dir/photos-bench" "$@"

# The issue-17 yardstick: the commands themselves on the same records, one core, best of 3 each:
# `llava-data convert` (tokenize, decode, exact tiles, a SHA-256 per tile, one JSON line per
# record) against `llava-data build` at the default settings (raw tiles, zstd 1). Both include
# process start and the tokenizer load; the in-process ratios above leave those out.
commands() {
  local set=$1 best_convert=999999 best_build=999999
  local clock="$dir/$set/time.txt"
  for _ in 1 2 3; do
    RAYON_NUM_THREADS=1 /usr/bin/time -f %e -o "$clock" taskset -c 0 "$bin" convert \
      --data "$dir/$set/bench.jsonl" --image-folder / --tokenizer .cache/tokenizer/tokenizer.json \
      > /dev/null
    best_convert=$(awk -v best="$best_convert" '{print ($1 < best) ? $1 : best}' "$clock")
    rm -rf "$dir/$set/commands-out"
    /usr/bin/time -f %e -o "$clock" taskset -c 0 "$bin" build "$dir/$set/datasets.toml" \
      --output "$dir/$set/commands-out" --threads 1 > /dev/null 2>&1
    best_build=$(awk -v best="$best_build" '{print ($1 < best) ? $1 : best}' "$clock")
  done
  echo "$set: convert ${best_convert} s, build ${best_build} s, build / convert" \
    "$(awk -v b="$best_build" -v c="$best_convert" 'BEGIN {printf "%.2f", b / c}')x" \
    "($records records, one core, best of 3)"
}
echo "== the commands, one core: llava-data convert vs llava-data build (default settings)"
commands bundled
commands photos-bench
