#!/usr/bin/env bash
# Peak memory of `llava-data build --threads 16` on a mixture made only of the largest images
# `max_image_pixels` allows (13376 x 13376 = 178,921,376 pixels, just under Pillow's 178,956,970):
# N copies of one solid-colour PNG (a few hundred KB on disk, 537 MB decoded).
# Usage: scripts/bench-large-images.sh [N=16] [BIN=target/debug/llava-data]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-16}
bin=${2:-$root/target/debug/llava-data}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/images"
python3 - "$dir/images/big.png" <<'PY'
import struct, sys, zlib
w = h = 13376
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
z = zlib.compressobj(9)
row = b"\0" + bytes([200, 120, 40]) * w
idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
with open(sys.argv[1], "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
PY
for i in $(seq 1 "$n"); do
  ln "$dir/images/big.png" "$dir/images/big$i.png"
  echo "{\"id\": \"big$i\", \"image\": \"big$i.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\nDescribe.\"}, {\"from\": \"gpt\", \"value\": \"Orange.\"}]}"
done > "$dir/big.jsonl"
cat > "$dir/datasets.toml" <<TOML
output = "out"
tokenizer = "$root/.cache/tokenizer/tokenizer.json"
batch_size = 4
group_size = 4
[[sources]]
name = "big"
json = "big.jsonl"
image_folder = "images"
template = "llava_llama_3"
TOML
ls -l "$dir/images/big.png"
/usr/bin/time -f "peak RSS %M KiB, %e s wall" "$bin" build "$dir/datasets.toml" --threads 16
