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
