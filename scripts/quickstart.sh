#!/usr/bin/env bash
# Quick start: installs what is missing, fetches the tokenizer, builds the bundled example
# mixture (datasets.toml → out/example) and shows what came out.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
./scripts/setup.sh
cargo build -p llava-data
bin=${CARGO_TARGET_DIR:-target}/debug
"$bin/llava-data" build datasets.toml
echo
echo "First record of the instruction data as the model will see it (llava-data convert):"
"$bin/llava-data" convert --data fixtures/data/llava_instruct_150k.json \
  --image-folder fixtures/images/coco/train2017 --tokenizer .cache/tokenizer/tokenizer.json \
  --template llava_llama_3 | head -n 1 | python3 -c '
import json, sys
r = json.loads(sys.stdin.readline())
print({k: (v if k not in ("input_ids", "labels") else f"[{len(v)} ids]") for k, v in r.items()})'
