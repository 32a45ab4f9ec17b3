#!/usr/bin/env bash
# Runs ON a lent GPU machine (H100/H200, CUDA 13 driver, no Rust), from the repo root, with the
# .gpu/ folder of scripts/gpu-prepare.sh carried. Prints ONE JSON object on stdout: the device,
# whether the CUDA binary starts, `llava-trainer parity` on CUDA (f32, bf16) and on the CPU
# against the tiny fixture's HF goldens (each exits non-zero past its tolerance, docs/gpu.md),
# `llava-trainer bench` of the full 32-layer 8B model at 8192 tokens in bf16 without the
# optimizer, and the 2-layer points (seq 2048 text-only and 8192 with one 5-tile image):
# tokens/s, MFU (torchtitan's formula, stated in the JSON), the time in forward, recomputation,
# backward, optimizer and communication, peak memory; and short NCCL training runs (world size 1
# through the launcher path; one rank per GPU when there are several). Each step runs under a
# timeout and within a total budget (LLAVA_GPU_CHECK_BUDGET seconds, default 300, so that a
# failed first try can be rerun within one 15-minute lease); a failed step is recorded in the
# JSON and the next one runs. Step logs go to $LLAVA_GPU_CHECK_LOGS (default: a temporary
# folder); when $OUT is set (the device tool), $OUT/gpu-check.json and $OUT/gpu-check.log too.
#
# `--device cpu`: the steps that need no GPU, on tiny shapes, with a local binary
# ($LLAVA_TRAINER_BIN, default target/debug/llava-trainer) and fixtures/tiny-llava-next-a: the
# test suite runs it, so this script and the JSON keys it reads are checked on every commit.
#
# "ok" is true only if every parity run passed its tolerances, every bench ran, and no step
# failed. Exit status: 0 if ok, 1 otherwise (the JSON is printed either way).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
gpu=${LLAVA_GPU_DIR:-.gpu}
device=cuda
while (($#)); do
  case $1 in
    --device) device=${2:?--device needs cpu or cuda}; shift 2 ;;
    --device=*) device=${1#--device=}; shift ;;
    *) echo "gpu-check: unknown argument $1 (only --device cpu|cuda)" >&2; exit 2 ;;
  esac
done
[[ $device == cpu || $device == cuda ]] || { echo "gpu-check: --device cpu or cuda, not $device" >&2; exit 2; }
budget=${LLAVA_GPU_CHECK_BUDGET:-300}
deadline=$((SECONDS + budget))
work=$(mktemp -d)
logs=${LLAVA_GPU_CHECK_LOGS:-$work/logs}
mkdir -p "$logs"
bin=$work/llava-trainer
[[ $device == cpu ]] && bin=${LLAVA_TRAINER_BIN:-$root/target/debug/llava-trainer}
# Panics keep their backtrace; plain errors print just their message chain.
export RUST_BACKTRACE=1 RUST_LIB_BACKTRACE=0
: >"$logs/steps.tsv"

# step NAME LIMIT_S CMD...: runs CMD with stdout/stderr in $logs/NAME.{out,err}, never fails.
step() {
  local name=$1 limit=$2 left rc=0 t0=$SECONDS
  shift 2
  left=$((deadline - SECONDS))
  ((limit < left)) || limit=$left
  if ((limit < 5)); then
    echo "skipped: the check's budget of ${budget} s was used up" >"$logs/$name.err"
    : >"$logs/$name.out"
    printf '%s\t%s\t%s\n' "$name" skipped 0 >>"$logs/steps.tsv"
    return 0
  fi
  echo "gpu-check: $name (limit ${limit} s)" >&2
  timeout -k 5 "$limit" "$@" >"$logs/$name.out" 2>"$logs/$name.err" </dev/null || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$logs/steps.tsv"
  return 0
}

if [[ $device == cuda ]]; then
# NVIDIA's run-time libraries: the pip wheels of the image's python3 (torch preloads them itself,
# so they are not on the loader path), and the driver's folder for libcuda.so.1.
purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
libdirs=()
for d in "$purelib"/nvidia/cu13/lib "$purelib"/nvidia/nccl/lib /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
  [[ -d $d ]] && libdirs+=("$d")
done
# Wheels carried in .gpu/wheels (if any) fill in what the image lacks (the machine has no network).
if compgen -G "$gpu/wheels/*.whl" >/dev/null; then
  step pip_install 120 python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/site" "$gpu"/wheels/*.whl
  [[ -d $work/site/nvidia/cu13/lib ]] && libdirs=("$work/site/nvidia/cu13/lib" "${libdirs[@]}")
fi
[[ -z ${LD_LIBRARY_PATH:-} ]] || libdirs+=("$LD_LIBRARY_PATH")
LD_LIBRARY_PATH=$(
  IFS=:
  echo "${libdirs[*]}"
)
export LD_LIBRARY_PATH

step nvidia_smi 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
step unpack 60 python3 -c '
import hashlib, json, lzma, os, shutil, sys
src, dst, manifest = sys.argv[1:]
with lzma.open(src) as f, open(dst, "wb") as g:
    shutil.copyfileobj(f, g)
os.chmod(dst, 0o755)
want = json.load(open(manifest))["binary_sha256"]
got = hashlib.sha256(open(dst, "rb").read()).hexdigest()
print(got)
sys.exit(0 if got == want else f"sha256 {got} != manifest {want}")
' "$gpu/llava-trainer.xz" "$bin" "$gpu/manifest.json"
step ldd 30 ldd "$bin"
fi
# On CUDA the binary is linked with BIND_NOW: it starts only if every CUDA symbol resolves.
step start 30 "$bin" --version
if [[ $device == cuda ]]; then
  fx=$gpu/fixture
  step parity_cuda_f32 60 "$bin" parity --fixture "$fx" --device cuda --json
  step parity_cuda_bf16 45 "$bin" parity --fixture "$fx" --device cuda --bf16 --json
  step parity_cpu_f32 45 "$bin" parity --fixture "$fx" --device cpu --json
  # The full model first (the figure users need), then the 2-layer points.
  bench=("$bin" bench --model llava-next-8b --bf16 --device cuda --steps 2 --warmup 1
    --phase-steps 1 --peak-tflops 989 --json)
  step bench_full_8192 120 "${bench[@]}" --seq 8192 --images 1 --no-optimizer
  step bench_l2_2048 40 "${bench[@]}" --layers 2 --seq 2048 --images 0
  step bench_l2_8192 45 "${bench[@]}" --layers 2 --seq 8192 --images 1
  step bench_l2_8192_no_recompute 45 "${bench[@]}" --layers 2 --seq 8192 --images 1 \
    --no-gradient-checkpointing
else
  fx=$root/fixtures/tiny-llava-next-a
  step parity_cpu_f32 60 "$bin" parity --fixture "$fx" --device cpu --json
  step parity_cpu_bf16 60 "$bin" parity --fixture "$fx" --device cpu --bf16 --json
  # The same benches on the tiny shape (trainer/configs/tiny-model.json), not the 8B one.
  bench=("$bin" bench --model tiny --device cpu --steps 1 --warmup 0 --phase-steps 1 --json)
  step bench_full_8192 60 "${bench[@]}" --seq 3072 --images 1 --no-optimizer
  step bench_l2_2048 30 "${bench[@]}" --layers 2 --seq 256 --images 0
fi
# NCCL (issue 11): a training run as rank 0 of a torchrun-style job of one (NCCL refuses two ranks
# on one GPU), then `--nproc-per-node` with one rank per GPU when the machine has several. Inputs:
# synthetic five-tile shards and the README's tiny model, made here by the binary itself.
ngpu=0
if [[ $device == cuda ]]; then
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
step nccl_inputs 60 bash -c '"$1" loader-bench --shards "$2/synth" --make-synthetic 32 --workers 2 \
  --max-batches 1 && "$1" init --config trainer/configs/tiny-model.json --output "$2/tiny-model"' \
  _ "$bin" "$work"
nccl_run=("$bin" run --shards "$work/synth" --model "$work/tiny-model" --max-steps 3 --workers 2
  --lr 1e-3 --rendezvous-timeout 60)
step nccl_world_1 90 env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 \
  MASTER_PORT=29541 "${nccl_run[@]}" --output "$work/nccl-1" --device cuda
if ((ngpu > 1)); then
  step nccl_world_n 120 "${nccl_run[@]}" --output "$work/nccl-n" --device cuda --nproc-per-node "$ngpu"
fi
fi

summary=$work/summary.json
if ! LLAVA_GPU_COUNT=$ngpu LLAVA_GPU_WORK=$work python3 - "$logs" "$gpu" "$budget" "${LD_LIBRARY_PATH:-}" "$device" >"$summary" <<'EOF'; then
import json, os, sys
logs, gpu, budget, ld_path, device = sys.argv[1:]

def text(name, ext):
    try:
        with open(os.path.join(logs, f"{name}.{ext}"), errors="replace") as f:
            return f.read()
    except OSError:
        return ""

steps = {}
for line in text("steps", "tsv").splitlines():
    name, rc, wall = line.split("\t")
    steps[name] = {"rc": rc if rc == "skipped" else int(rc), "wall_s": int(wall)}

def status(name):
    s = steps.get(name, {"rc": "not run", "wall_s": 0})
    out = {"ok": s["rc"] == 0, "rc": s["rc"], "wall_s": s["wall_s"]}
    if s["rc"] != 0:
        lines = text(name, "err").strip().splitlines()
        # anyhow's "Error: ..." block or a panic's message; else the end of stderr.
        first = next((i for i, l in enumerate(lines) if l.startswith("Error:") or "panicked at" in l), None)
        keep = lines[first:first + 6] if first is not None else lines[-6:]
        out["error"] = "\n".join(l for l in keep if l.strip())[-1500:]
        if s["rc"] == 124:
            out["error"] = "timed out. " + out["error"]
    return out

def json_out(name):
    t = text(name, "out")
    try:
        return json.loads(t[t.index("{"):])
    except ValueError:
        return None

summary = {"check": "llava-trainer gpu-check", "device_kind": device, "budget_s": int(budget)}
try:
    summary["manifest"] = json.load(open(os.path.join(gpu, "manifest.json")))
except (OSError, ValueError) as e:
    summary["manifest"] = {"error": str(e)}
smi = text("nvidia_smi", "out").strip().splitlines()
fields = [f.strip() for f in smi[0].split(",")] if smi else []
summary["device"] = dict(zip(["name", "driver", "memory_total", "compute_cap"], fields))
summary["device"]["status"] = status("nvidia_smi")
ldd = text("ldd", "out").splitlines()
summary["libraries"] = {
    "ld_library_path": ld_path,
    "not_found": [l.split()[0] for l in ldd if "not found" in l],
    "cuda_libs": [l.strip() for l in ldd if any(k in l for k in ("cuda", "cublas", "curand", "nvrtc", "nccl"))],
}
summary["binary"] = {"unpack": status("unpack"), "start": status("start"), "version": text("start", "out").strip()}
if "pip_install" in steps:
    summary["binary"]["pip_install"] = status("pip_install")

parity = {}
for name in sorted(n for n in steps if n.startswith("parity_")):
    p = dict(status(name))
    r = json_out(name)
    if r:
        p.update({
            "passed": r["passed"],
            "checks": r["checks"],
            "logits_max_abs": r["logits"]["max_abs"],
            "logits_max_rel": r["logits"]["max_rel"],
            "loss": r["loss"],
            "loss_abs_error": r["loss_abs_error"],
            "loss_rel_error": r["loss_rel_error"],
            "gradients_max_abs": r["gradients"]["max_abs"],
            "gradients_max_rel": r["gradients"]["max_rel"],
            "gradients_min_cosine": r["gradients"]["cosine"],
            "gradients_compared": r["gradients_compared"],
            "worst_gradient": r["worst_gradient"],
            "gradient_mismatches": r["gradient_mismatches"],
        })
    parity[name[len("parity_"):]] = p
summary["parity"] = parity

bench = []
for name in [n for n in steps if n.startswith("bench_")]:
    b = {"name": name, **status(name)}
    r = json_out(name)
    if r:
        gib = lambda x: round(x / 2**30, 2)
        b.update({
            "model": r["model"], "layers": r["layers"], "seq": r["seq"],
            "images_per_row": r["images_per_row"], "bf16": r["bf16"],
            "gradient_checkpointing": r["gradient_checkpointing"], "optimizer": r["optimizer"],
            "attention": r["attention"],
            "tokens_per_s": round(r["tokens_per_s"], 1), "step_s": round(r["step_s"], 4),
            "achieved_tflops": round(r["achieved_tflops"], 2), "mfu": r["mfu"],
            "peak_tflops": r["peak_tflops"], "flops_formula": r["flops_formula"],
            "phases_s": {k: round(v, 4) for k, v in r["phases"].items()},
            "peak_memory_gib": gib(r["memory"]["peak"]),
            "activations_gib": gib(r["memory"]["activations"]),
            "plan_activations_gib": gib(r["plan"]["activations"]) if "activations" in r["plan"] else None,
            "memory_method": r["memory"]["method"], "loss": r["loss"],
        })
    bench.append(b)
summary["bench"] = bench

def last_loss(out_dir):
    try:
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            return json.loads(f.read().strip().splitlines()[-1])["loss"]
    except (OSError, ValueError, IndexError, KeyError):
        return None

nccl = {"gpus": int(os.environ.get("LLAVA_GPU_COUNT", "0") or 0)}
for name, out_dir in (("nccl_inputs", None), ("nccl_world_1", "nccl-1"), ("nccl_world_n", "nccl-n")):
    if name in steps:
        nccl[name] = dict(status(name))
        if out_dir:
            nccl[name]["last_loss"] = last_loss(os.path.join(os.environ["LLAVA_GPU_WORK"], out_dir))
summary["nccl"] = nccl
summary["failed_steps"] = [n for n, s in steps.items() if s["rc"] != 0]
# ok only if parity passed (each run's own checks; the binary also exits 1 on a failure), every
# bench ran and reported, and no other step failed.
summary["parity_passed"] = bool(parity) and all(p.get("passed") is True and p["ok"] for p in parity.values())
summary["bench_ran"] = bool(bench) and all(b["ok"] and b.get("tokens_per_s") for b in bench)
summary["ok"] = summary["parity_passed"] and summary["bench_ran"] and not summary["failed_steps"]
print(json.dumps(summary, indent=1))
EOF
  # Without python3 (or if the summary itself broke): the step table, as JSON by hand.
  {
    printf '{"check": "llava-trainer gpu-check", "summary_error": "python3 summary failed", "steps": {'
    awk -F'\t' '{ printf "%s\"%s\": {\"rc\": \"%s\", \"wall_s\": %s}", NR > 1 ? ", " : "", $1, $2, $3 }' "$logs/steps.tsv"
    printf '}, "ok": false}\n'
  } >"$summary"
fi
if [[ -n ${OUT:-} ]]; then
  cp "$summary" "$OUT/gpu-check.json"
  for f in "$logs"/steps.tsv "$logs"/*.out "$logs"/*.err; do
    [[ -f $f ]] || continue
    echo "===== $(basename "$f")"
    tail -n 300 "$f"
  done >"$OUT/gpu-check.log"
fi
cat "$summary"
python3 -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("ok") else 1)' "$summary" 2>/dev/null
