#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, within 10 minutes (DEADLINE_S, default 570 s):
# every figure the README's GPU section needs, written to $OUT (default
# benchmarks/results/gpu) as it is measured. A step that fails or runs out of
# time is noted in summary.txt and the script goes on to the next one: the
# first run on a new GPU always reaches the benchmarks. Steps, most valuable first:
#
#   1. environment: GPU, driver, clocks, torch/CUDA/cuDNN versions
#   2. the CUDA tests (pytest -m gpu)
#   3. raw model (TorchScript; predict on decoded images, one forward pass per
#      batch) at fp32/fp16/bf16 on 256x256 PNGs, batches 1 to 256, and on
#      1024x1024 JPEGs and 12 Mpx photos at batch 1 and 8
#   4. the auto batch-size measurement the server runs, as a table
#   5. fp16/bf16 masks against fp32 on 1 Mpx and 12 Mpx images
#   6. the service (default batching) at fp16, c1/16/64 on the PNGs, c16 on the
#      JPEGs and photos, with nvidia-smi sampled every 0.5 s meanwhile
#   7. compiled packages (torch.export + AOTInductor) for this GPU, their raw
#      speed, and the service on the chosen one (when time is left)
#
#   benchmarks/gpu_check.sh            (after `make install` with a CUDA torch:
#                                       make TORCH_SPEC='torch==2.13.0 --index-url ...cu128' install)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu}
DEADLINE_S=${DEADLINE_S:-570}
START=$SECONDS

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S COMMAND...: runs COMMAND with at most LIMIT_S seconds (less when
# the deadline is nearer), notes how it ended, never stops the script.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE_S - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    note "== $name: skipped (deadline: ${left} s left)"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s)"
  local began=$SECONDS
  timeout "$limit" bash -c '"$@"' step "$@"
  local code=$?
  local took=$((SECONDS - began))
  if [ "$code" -eq 0 ]; then
    note "== $name: ok (${took} s)"
  elif [ "$code" -eq 124 ]; then
    note "== $name: TIMED OUT after ${took} s (what it wrote so far is in $OUT)"
  else
    note "== $name: FAILED with status $code (${took} s)"
  fi
  return 0
}

environment() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit,pstate --format=csv
  nvidia-smi -q -d CLOCK,PERFORMANCE | head -60
  "$PY" - <<'PY'
import os, platform, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, compute {p.major}.{p.minor}")
print(f"host: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs usable")
PY
}

raw_model() {
  for precision in fp32 fp16 bf16; do
    "$PY" -m benchmarks.ceiling --device cuda --precision "$precision" --images png256 \
      --batches 1 8 32 64 128 256 --seconds 1 > "$OUT/ceiling-$precision-png256.json" \
      && note "raw $precision png256: $(cat "$OUT/ceiling-$precision-png256.json")"
  done
  for images in jpeg1024 photo12mp; do
    "$PY" -m benchmarks.ceiling --device cuda --precision fp16 --images "$images" \
      --batches 1 8 --seconds 1 > "$OUT/ceiling-fp16-$images.json" \
      && note "raw fp16 $images: $(cat "$OUT/ceiling-fp16-$images.json")"
  done
}

auto_batch() {
  "$PY" - <<'PY' | tee -a "$SUMMARY"
import model
from service.warmup import choose_batch_size, measure_throughput
for precision in ("fp16", "fp32"):
    seg = model.load(device="cuda", precision=precision, format="torchscript")
    throughput, _ = measure_throughput(seg, limit=512, budget_s=30)
    print(f"auto batch, {precision} ({seg.recipe}): chooses {choose_batch_size(throughput)}")
    for b, v in throughput.items():
        print(f"  batch {b:4d}: {v:9.1f} images/s")
PY
}

# Samples the GPU every 0.5 s while a command runs.
with_smi() {
  local csv=$1
  shift
  nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.memory,memory.used,clocks.sm,power.draw \
    --format=csv -lms 500 > "$csv" &
  local smi=$!
  "$@"
  local code=$?
  kill "$smi" 2>/dev/null
  "$PY" - "$csv" <<'PY' | tee -a "$SUMMARY"
import csv, statistics, sys
rows = list(csv.reader(open(sys.argv[1])))[1:]
util = [float(r[1].split()[0]) for r in rows if len(r) > 3 and r[1].strip().split()[0].replace(".", "").isdigit()]
mem = [float(r[3].split()[0]) for r in rows if len(r) > 3 and r[3].strip().split()[0].isdigit()]
if util:
    print(f"  nvidia-smi ({len(util)} samples): GPU busy median {statistics.median(util):.0f}%, max {max(util):.0f}%; "
          f"memory used max {max(mem):.0f} MiB")
PY
  return $code
}

service() {  # service FORMAT PRECISION
  with_smi "$OUT/smi-$1-$2.csv" \
    "$PY" -m benchmarks run --quick --scenarios chanseg --images png256 jpeg1024 photo12mp \
      --jpeg-concurrency 16 --rates \
      --env CHANSEG_DEVICE=cuda "CHANSEG_PRECISION=$2" "CHANSEG_MODEL_FORMAT=$1" \
      --out "$OUT/serve-$1-$2" > "$OUT/serve-$1-$2.log" 2>&1
  local code=$?
  tail -25 "$OUT/serve-$1-$2.log" | tee -a "$SUMMARY"
  return $code
}

packages() {
  "$PY" -m model compile --device cuda --precision auto --count 32 > "$OUT/compile.json" || return 1
  tee -a "$SUMMARY" < "$OUT/compile.json"
  for precision in fp32 fp16 bf16; do
    package=$("$PY" -c "import torch; from model.pretrained import default_package_path as p; print(p(torch.device('cuda'), '$precision'))")
    [ -f "$package" ] || continue
    "$PY" -m benchmarks.ceiling --device cuda --model "$package" --images png256 \
      --batches 1 8 32 64 --seconds 1 > "$OUT/ceiling-package-$precision.json" \
      && note "package $precision png256: $(cat "$OUT/ceiling-package-$precision.json")"
  done
}

# Sourced with GPU_CHECK_LIB=1 (the tests do): the functions above, nothing run.
if [ -n "${GPU_CHECK_LIB:-}" ]; then
  return 0 2>/dev/null || exit 0
fi

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none)" >&2
  exit 3
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch has no CUDA here ($("$PY" -c 'import torch; print(torch.__version__)')); install a CUDA build" >&2
  exit 3
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export CHANSEG_CACHE_DIR=${CHANSEG_CACHE_DIR:-$OUT/cache}

export PY OUT SUMMARY
export -f note environment raw_model auto_batch with_smi service packages

step "environment" 30 environment 2>&1 | tee "$OUT/environment.txt"
step "CUDA tests" 90 bash -c "'$PY' -m pytest -q -m gpu tests/model tests/service 2>&1 | tail -15" | tee "$OUT/tests.txt"
step "raw model" 120 raw_model
step "auto batch size" 60 auto_batch
step "fp16/bf16 masks against fp32" 60 bash -c "'$PY' -m benchmarks.agreement --device cuda > '$OUT/agreement.json' && cat '$OUT/agreement.json' >> '$SUMMARY'"
step "service, TorchScript fp16" 180 service torchscript fp16
step "compiled packages" 240 packages
step "service, compiled package (auto)" 180 service auto auto
note "total $((SECONDS - START)) s; written: $OUT/ (summary.txt has every figure)"
