#!/usr/bin/env bash
# loader-bench from a local S3 server (s3s-fs on 127.0.0.1) vs the same shards as local files,
# in one run: samples/s per worker and peak memory for local files, the bucket without a cache,
# the bucket with a cold cache and with a warm one (docs/object-storage.md).
#   scripts/bench-object-store.sh [SAMPLES] [WORKERS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
samples=${1:-800}
workers=${2:-4}
s3s=${LLAVA_S3S_FS:-$root/.cache/tools/bin/s3s-fs}
[[ -x $s3s ]] || { echo "s3s-fs missing: run scripts/setup.sh" >&2; exit 1; }
cargo build -q --release -p llava-trainer --bin llava-trainer
bin=$root/target/release/llava-trainer
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/s3/bench"
"$bin" loader-bench --shards "$work/s3/bench/synth" --make-synthetic "$samples" --max-batches 1 >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$s3s" --host 127.0.0.1 --port "$port" --access-key bench --secret-key bench-secret "$work/s3" \
  >/dev/null 2>&1 &
server=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ACCESS_KEY_ID=bench \
  AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
run() { # label, args…
  local label=$1; shift
  "$bin" loader-bench --workers "$workers" --json "$@" |
    python3 -c "import json,sys; r=json.load(sys.stdin); print('%-22s %10.1f samples/s %8.1f per worker  peak %7.1f MiB' % (sys.argv[1], r['samples_per_s'], r['samples_per_s']/$workers, r['peak_rss_mib']))" "$label"
}
run "local files" --shards "$work/s3/bench/synth"
run "s3, no cache" --shards s3://bench/synth
run "s3, cache (cold)" --shards s3://bench/synth --cache-dir "$work/cache"
run "s3, cache (warm)" --shards s3://bench/synth --cache-dir "$work/cache"
