#!/usr/bin/env bash
# Multi-process CPU training under the launchers people use (issue 28), one line each:
# the real torchrun in its three modes (static --master-port, --standalone, --rdzv-backend c10d),
# a Slurm-like environment set by hand (srun's variables, with and without MASTER_PORT), and
# llava-trainer's own --nproc-per-node supervisor. Every launch trains the tiny model for 3
# steps with 2 CPU ranks; each line compares its losses with world size 1 (grad_accum 2).
#
# torchrun: $LLAVA_TORCHRUN (a torchrun binary or a python with torch),
# else the test venv's .venv/bin/torchrun (scripts/setup.sh installs torch there).
# The shards are the bundled example (out/example, built with `llava-data build datasets.toml`
# when missing; needs scripts/fetch-tokenizer.sh's tokenizer), or SHARDS=dir.
# Usage: scripts/torchrun-check.sh   (builds target/release; BIN_DIR=dir to use other binaries)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [[ -z ${BIN_DIR:-} ]]; then
  cargo build --release -p llava-trainer -p llava-data --bins >&2
  BIN_DIR=$root/target/release
fi
bin=$BIN_DIR/llava-trainer
shards=${SHARDS:-$root/out/example}
[[ -n ${SHARDS:-} || -f out/example/manifest.json ]] || "$BIN_DIR/llava-data" build datasets.toml >&2
tr=()
for c in "${LLAVA_TORCHRUN:-}" .venv/bin/torchrun; do
  [[ -n $c && -x $c ]] || continue
  case $(basename "$c") in
    python*) "$c" -c 'import torch.distributed.run' 2>/dev/null && tr=("$c" -m torch.distributed.run) ;;
    *) tr=("$c") ;;
  esac
  [[ ${#tr[@]} -gt 0 ]] && break
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT SLURM_PROCID SLURM_NTASKS \
  SLURM_LOCALID SLURM_JOB_ID TORCHELASTIC_USE_AGENT_STORE
"$bin" init --config trainer/configs/tiny-model.json --output "$work/model" >/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
args() { # output grad_accum
  echo run --shards "$shards" --model "$work/model" --output "$1" --max-steps 3 --lr 1e-3 \
    --warmup-ratio 0.1 --workers 1 --device cpu --no-resume --grad-accum "$2" --rendezvous-timeout 120
}
losses() { python3 -c 'import json,sys; print(" ".join("%.7f"%json.loads(l)["loss"] for l in open(sys.argv[1]+"/log.jsonl") if "\"loss\"" in l))' "$1"; }
compare() { # name output seconds
  python3 - "$1" "$2" "$work/ref" "$3" <<'PY'
import json, sys
name, out, ref, secs = sys.argv[1:]
def l(d):
    return [json.loads(x)["loss"] for x in open(d + "/log.jsonl") if '"loss"' in x]
a, b = l(out), l(ref)
diff = max(abs(x - y) for x, y in zip(a, b)) if a and len(a) == len(b) else float("inf")
ok = diff <= 1e-6 * max(1.0, max(abs(y) for y in b))
print(f"{'ok  ' if ok else 'FAIL'} {name:<34} losses {' '.join('%.6f' % x for x in a)}  max|diff| vs world 1 {diff:.1e}  {secs}s")
PY
}
status=0
step() { # name output cmd...
  local name=$1 out=$2; shift 2
  local t0=$SECONDS
  if "$@" >"$out.log" 2>&1; then
    compare "$name" "$out" $((SECONDS - t0)) || status=1
  else
    echo "FAIL $name: exit $? (log: last lines below)"; tail -5 "$out.log"; status=1
  fi
}
"$bin" $(args "$work/ref" 2) >"$work/ref.log" 2>&1 || { echo "world 1 reference failed"; tail "$work/ref.log"; exit 1; }
echo "world 1 reference: losses $(losses "$work/ref")"
if [[ ${#tr[@]} -gt 0 ]]; then
  step "torchrun static --master-port" "$work/static" "${tr[@]}" --nproc-per-node 2 --master-port "$(free_port)" --no-python "$bin" $(args "$work/static" 1)
  step "torchrun --standalone" "$work/standalone" "${tr[@]}" --nproc-per-node 2 --standalone --no-python "$bin" $(args "$work/standalone" 1)
  step "torchrun --rdzv-backend c10d" "$work/c10d" "${tr[@]}" --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$(free_port)" --no-python "$bin" $(args "$work/c10d" 1)
else
  echo "SKIP torchrun: none found (set LLAVA_TORCHRUN)"
fi
slurm() { # output port-or-empty
  local pids=() r port=$2
  for r in 0 1; do
    env SLURM_PROCID=$r SLURM_NTASKS=2 SLURM_LOCALID=$r SLURM_TASKS_PER_NODE=2 SLURM_JOB_NODELIST=127.0.0.1 \
      SLURM_JOB_ID=$$ ${port:+MASTER_ADDR=127.0.0.1 MASTER_PORT=$port} "$bin" $(args "$1" 1) >"$1.rank$r.log" 2>&1 &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  return $rc
}
step "slurm-like env, MASTER_PORT set" "$work/slurm1" slurm "$work/slurm1" "$(free_port)"
step "slurm-like env, no MASTER_*" "$work/slurm2" slurm "$work/slurm2" ""
step "llava-trainer --nproc-per-node 2" "$work/nproc" "$bin" $(args "$work/nproc" 1) --nproc-per-node 2
exit $status
