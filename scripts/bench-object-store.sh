#!/usr/bin/env bash
# loader-bench from a local S3 server (s3s-fs on 127.0.0.1) vs the same shards as local files,
# same release build, one run: samples/s (total and per worker) and peak memory for local files,
# the bucket without a cache, with a cold cache and with a warm one (docs/object-storage.md).
#   scripts/bench-object-store.sh [SAMPLES] [WORKERS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
samples=${1:-800}
workers=${2:-4}
s3s=${LLAVA_S3S_FS:-$(command -v s3s-fs || echo "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs")}
[[ -x $s3s ]] || { echo "s3s-fs missing: run scripts/setup.sh" >&2; exit 1; }
# LLAVA_BENCH_PROFILE=debug reuses a debug build (slower decoding: compare rows, not machines).
profile=${LLAVA_BENCH_PROFILE:-release}
if [[ $profile == release ]]; then
  cargo build -q --release -p llava-trainer --bin llava-trainer
else
  cargo build -q -p llava-trainer --bin llava-trainer
fi
bin=${CARGO_TARGET_DIR:-$root/target}/$profile/llava-trainer
work=$(mktemp -d)
server=
trap '[[ -n $server ]] && kill $server 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/s3/bench"
# The synthetic shards are written straight into the server's folder: the bucket and the local
# run read the very same files.
"$bin" loader-bench --shards "$work/s3/bench/synth" --make-synthetic "$samples" --max-batches 1 >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$s3s" --host 127.0.0.1 --port "$port" --access-key bench --secret-key bench-secret "$work/s3" \
  >/dev/null 2>&1 &
server=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ACCESS_KEY_ID=bench \
  AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
echo "loader-bench ($profile), $samples synthetic five-tile samples, $workers workers, $(nproc) CPUs"
printf '%-18s %10s %12s %10s %8s\n' source samples/s per-worker peak-MiB fetches
run() { # label, args…
  local label=$1; shift
  "$bin" loader-bench --workers "$workers" --json "$@" | python3 -c '
import json, sys
r = json.load(sys.stdin)
o = r.get("object_store") or {}
print("%-18s %10.1f %12.1f %10.1f %8s" % (sys.argv[1], r["samples_per_s"],
      r["samples_per_s_per_worker"], r["peak_rss_mib"], o.get("fetches", "-")))' "$label"
}
run "local files" --shards "$work/s3/bench/synth"
run "s3, no cache" --shards s3://bench/synth
run "s3, cache cold" --shards s3://bench/synth --cache-dir "$work/cache"
run "s3, cache warm" --shards s3://bench/synth --cache-dir "$work/cache"
