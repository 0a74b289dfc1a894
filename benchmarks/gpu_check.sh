#!/usr/bin/env bash
# Every GPU figure docs/performance.md's GPU section needs, in one run of at most DEADLINE_S
# (540 s) on a machine with an NVIDIA GPU. On the lent GPU machine it is started by
# benchmarks/gpu_device_run.sh (see docs/performance.md, "On a GPU"); by hand:
#
#   PYTHON=.venv/bin/python RESULTS=runs/gpu-check benchmarks/gpu_check.sh
#
# Steps, most valuable first, each with its own time limit (the limits add up to
# DEADLINE_S; a step that ends early leaves its time to the last one):
#
#   1. environment: GPU, driver, clocks, torch/CUDA/cuDNN, triton, g++, Python.h
#   2. the CUDA tests (pytest -m gpu)
#   3. raw model (TorchScript, one forward pass per batch, one process:
#      benchmarks.gpu_raw) at fp32/fp16/bf16 on 256x256 PNGs at batch 1 to 256, and
#      fp16 on 1 Mpx JPEGs and 12 Mpx photos at batch 1 and 8
#   4. the service at fp16, TorchScript, default batching (python -m benchmarks run:
#      c1/16/64 on the PNGs, c16 on the JPEGs), nvidia-smi sampled every 0.5 s
#   5. the auto batch-size measurement the server runs, as a table (fp16, fp32)
#   6. fp16/bf16 masks against fp32 on 1 Mpx and 12 Mpx images
#   7. the compiled package (torch.export + AOTInductor, fp16): its raw speed
#
# The compile of step 7 starts in the background before step 1 and runs while the
# untimed steps (1, 2, 6) do; it is stopped (SIGSTOP) during the timed ones (3-5),
# so it never shares the machine with a measurement. Step 7 waits for it with what
# is left of the deadline and says so when it did not finish.
#
# How a step runs (step below): in a session of its own (setsid), its output
# written to RESULTS/logs/NN-name.log as it goes (PYTHONUNBUFFERED), a line it
# writes to $STEP_NOTE added to its status; `ok` only when
# its command exited 0, `FAILED` with the status otherwise, `TIMED OUT` when its
# limit passed (its process group gets SIGTERM, then SIGKILL), `skipped` when the
# deadline is too near to start it. Whatever it started, in any session (the
# servers benchmarks/servers.py starts have sessions of their own), carries
# GPU_CHECK_STEP in its environment and is killed when the step ends.
#
# Results: RESULTS/ (summary.txt is built from it by benchmarks/gpu_report.py);
# progress.txt has a line per step as it ends (copied to PROGRESS_COPY when set).
# Exit status: 0 when every step was ok, 1 otherwise, 3 when there is no GPU.
#
# Knobs (the rehearsal on a CPU sets them: benchmarks/gpu_rehearsal.sh):
# DEVICE (cuda), TIME_SCALE (1: every limit and the deadline times this),
# RAW_SPECS, SERVE_PRECISION, SERVE_ARGS, SERVE_ENV, AUTO_PRECISIONS, AUTO_LIMIT,
# AUTO_BUDGET_S, AGREEMENT_PRECISIONS, AGREEMENT_IMAGES, PACKAGE_PRECISION,
# PACKAGE_SPEC, PACKAGE_COUNT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1

PY=${PYTHON:-python3}
RESULTS=${RESULTS:-runs/gpu-check}
DEVICE=${DEVICE:-cuda}
TIME_SCALE=${TIME_SCALE:-1}
BATCHES=1,8,32,64,128,256
RAW_SPECS=${RAW_SPECS:-fp32:png256:$BATCHES fp16:png256:$BATCHES bf16:png256:$BATCHES fp16:jpeg1024:1,8 fp16:photo12mp:1,8}
RAW_SECONDS=${RAW_SECONDS:-1}
SERVE_PRECISION=${SERVE_PRECISION:-fp16}
SERVE_ARGS=${SERVE_ARGS:---images png256 jpeg1024 --concurrency 1 16 64 --jpeg-concurrency 16 --rates --window 2 --warmup 1 --max-windows 3 --ceiling-seconds 1 --ceiling-batches 1 8 32 64 128 256}
SERVE_ENV=${SERVE_ENV:-}
AUTO_PRECISIONS=${AUTO_PRECISIONS:-fp16 fp32}
AUTO_LIMIT=${AUTO_LIMIT:-512}
AUTO_BUDGET_S=${AUTO_BUDGET_S:-15}
AGREEMENT_PRECISIONS=${AGREEMENT_PRECISIONS:-fp16 bf16}
AGREEMENT_IMAGES=${AGREEMENT_IMAGES:-jpeg1024 photo12mp}
PACKAGE_PRECISION=${PACKAGE_PRECISION:-fp16}
PACKAGE_SPEC=${PACKAGE_SPEC:-$PACKAGE_PRECISION:png256:1,8,32,64}
PACKAGE_COUNT=${PACKAGE_COUNT:-32}

scaled() { awk -v s="$1" -v f="$TIME_SCALE" 'BEGIN { printf "%d", s * f + 0.5 }'; }
DEADLINE_S=$(scaled "${DEADLINE_S:-540}")
MIN_STEP_S=$(scaled 15)  # a step with less than this left is skipped, not started to be cut
GRACE_S=3                # from SIGTERM to SIGKILL
RUN_ID=${RUN_ID:-$$-$(date +%s)}
START_MS=$(date +%s%3N)

now_ms() { date +%s%3N; }
elapsed_s() { echo $((($(now_ms) - START_MS) / 1000)); }
left_s() { echo $((DEADLINE_S - $(elapsed_s))); }

progress() {  # a line in progress.txt (and its copy) and on the console
  echo "$*" | tee -a "$RESULTS/progress.txt"
  if [ -n "${PROGRESS_COPY:-}" ]; then cp "$RESULTS/progress.txt" "$PROGRESS_COPY" 2>/dev/null; fi
  return 0
}

alive() {  # alive PID: it exists and is not a zombie
  local stat
  { stat=$(<"/proc/$1/stat"); } 2>/dev/null || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

tagged() {  # tagged VAR=VALUE: the processes whose environment holds it
  grep -lzsx -- "$1" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx -e "$$" -e "$BASHPID"
}

# reap VAR=VALUE: SIGTERM every process tagged so, SIGKILL what is left after GRACE_S;
# prints what it found (pid and command name).
reap() {
  local pids pid i
  pids=$(tagged "$1" | tr '\n' ' ')
  [ -n "${pids// /}" ] || return 0
  for pid in $pids; do echo "$pid $(cat "/proc/$pid/comm" 2>/dev/null)"; done
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null
  for ((i = 0; i < GRACE_S * 5; i++)); do
    [ -n "$(tagged "$1")" ] || return 0
    sleep 0.2
  done
  # shellcheck disable=SC2086
  kill -KILL $(tagged "$1") 2>/dev/null
  return 0
}

STEP_N=0
CURRENT=
ANY_NOT_OK=0

start_run() {  # a fresh RESULTS/logs, steps.tsv and progress.txt
  mkdir -p "$RESULTS/logs"
  : >"$RESULTS/progress.txt"
  : >"$RESULTS/steps.tsv"
}

# step NAME LIMIT_S COMMAND...: runs COMMAND (a command or an exported function) for at
# most LIMIT_S x TIME_SCALE seconds, or what is left of the deadline; records how it
# ended in steps.tsv and progress.txt. Never stops the script.
step() {
  local name=$1 limit
  limit=$(scaled "$2")
  shift 2
  STEP_N=$((STEP_N + 1))
  local id
  id=$(printf '%02d' "$STEP_N")
  local log="$RESULTS/logs/$id-$1.log" left
  left=$(left_s)
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    record "$id" "$1" "$name" skipped 0 "$limit" "$log" "the deadline: ${left} s left of ${DEADLINE_S} s"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s; output: $log)"
  local began
  began=$(now_ms)
  local said="$RESULTS/logs/$id-$1.note"
  GPU_CHECK_RUN=$RUN_ID GPU_CHECK_STEP=$RUN_ID-$id STEP_LIMIT_S=$limit STEP_NOTE=$said \
    setsid bash -o pipefail -c '"$@"' "$name" "$@" >"$log" 2>&1 </dev/null &
  local pid=$! timed_out=0 code
  CURRENT=$pid
  while alive "$pid"; do
    if [ $(($(now_ms) - began)) -ge $((limit * 1000)) ]; then
      timed_out=1
      echo "gpu_check: the step's ${limit} s are up: SIGTERM to its process group" >>"$log"
      kill -TERM -- "-$pid" 2>/dev/null
      local i
      for ((i = 0; i < GRACE_S * 5; i++)); do alive "$pid" || break; sleep 0.2; done
      kill -KILL -- "-$pid" 2>/dev/null
      break
    fi
    sleep 0.2
  done
  wait "$pid"
  code=$?
  CURRENT=
  local left_behind
  left_behind=$(reap "GPU_CHECK_STEP=$RUN_ID-$id" | tr '\n' ',' | sed 's/,$//; s/,/, /g')
  [ -n "$left_behind" ] && echo "gpu_check: killed what the step left running: $left_behind" >>"$log"
  local took=$((($(now_ms) - began) / 1000)) status note=""
  if [ "$timed_out" -eq 1 ]; then
    status="TIMED OUT"
    note="cut at its ${limit} s limit; its output so far is in the log"
  elif [ "$code" -eq 0 ]; then
    status=ok
  else
    status=FAILED
    note="exit status $code"
  fi
  [ -s "$said" ] && note="${note:+$note: }$(head -c 300 "$said" | tr '\n\t' '  ' | sed 's/ *$//')"
  [ -n "$left_behind" ] && note="${note:+$note; }killed what it left running: $left_behind"
  record "$id" "$1" "$name" "$status" "$took" "$limit" "$log" "$note"
  tail -n 12 "$log" | sed 's/^/   | /'
  return 0
}

# record ID KEY NAME STATUS SECONDS LIMIT LOG NOTE: a line of steps.tsv (KEY: the step's
# command, which benchmarks/gpu_report.py knows the figures of) and of progress.txt.
record() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS/steps.tsv"
  [ "$4" = ok ] || ANY_NOT_OK=1
  progress "== $3: $4 ($5 s of ${6} s)${8:+ - $8}"
}

# background NAME COMMAND...: starts COMMAND like a step, without waiting; its exit
# status goes to RESULTS/NAME.status when it ends.
background() {
  local name=$1
  shift
  GPU_CHECK_RUN=$RUN_ID GPU_CHECK_STEP=$RUN_ID-bg-$name \
    setsid bash -o pipefail -c 'status=$1; shift; "$@"; echo $? >"$status"' "$name" "$RESULTS/$name.status" "$@" \
    >"$RESULTS/logs/bg-$name.log" 2>&1 </dev/null &
  echo "== $name: started in the background (output: $RESULTS/logs/bg-$name.log)"
  progress "   $name started in the background at $(elapsed_s) s"
}

pause() {  # pause NAME / resume NAME: SIGSTOP / SIGCONT to everything the background task runs
  local pids
  pids=$(tagged "GPU_CHECK_STEP=$RUN_ID-bg-$1" | tr '\n' ' ')
  [ -n "${pids// /}" ] || return 0
  # shellcheck disable=SC2086
  kill "-$2" $pids 2>/dev/null
  progress "   $1 $3 at $(elapsed_s) s"
}

cleanup() {  # whatever this run started and is still running
  local left_behind
  if [ -n "$CURRENT" ]; then kill -KILL -- "-$CURRENT" 2>/dev/null; fi
  pause compile CONT resumed  # a stopped process takes no SIGTERM until it runs again
  left_behind=$(reap "GPU_CHECK_RUN=$RUN_ID" | tr '\n' ',' | sed 's/,$//')
  [ -n "$left_behind" ] && progress "   killed at the end: $left_behind"
  return 0
}

on_signal() {
  progress "== gpu_check: stopped by a signal at $(elapsed_s) s; the steps not run are missing"
  cleanup
  exit 2
}

# --- the steps ------------------------------------------------------------------

environment() {
  if [ "$DEVICE" != cpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit,pstate --format=csv
    nvidia-smi -q -d CLOCK,PERFORMANCE | head -60
  fi
  echo "g++: $(g++ --version 2>&1 | head -1)"  # AOTInductor's wrapper is C++: compile needs it
  echo "gcc: $(gcc --version 2>&1 | head -1)"  # triton builds its launcher with it
  echo "nvcc: $(nvcc --version 2>&1 | tail -1); CUDA_HOME=${CUDA_HOME:-unset}; /usr/local/cuda: $(ls -d /usr/local/cuda 2>&1)"
  echo "libcuda: $(ldconfig -p 2>/dev/null | grep -o 'libcuda\.so[^ ]*' | sort -u | tr '\n' ' ')"
  nproc
  free -g | head -2
  df -h /tmp | tail -1
  "$PY" - "$RESULTS/environment.json" <<'PY'
import importlib.metadata as md
import json, os, platform, sys, sysconfig
import torch
info = {
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    "python_h": os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
    "host": platform.processor() or platform.machine(),
    "cpus": len(os.sched_getaffinity(0)),
    "packages": {},
}
for name in ("triton", "numpy", "pillow", "httpx", "fastapi", "starlette", "uvicorn", "pydantic",
             "pydantic-core", "pydantic-settings", "httptools", "uvloop", "safetensors", "prometheus-client"):
    try:
        info["packages"][name] = md.version(name)
    except md.PackageNotFoundError:
        info["packages"][name] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                   "sms": p.multi_processor_count, "compute": f"{p.major}.{p.minor}",
                   "bf16": torch.cuda.is_bf16_supported()}
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"), indent=1)
PY
}

cuda_tests() {
  # The files holding tests marked gpu (the rest of the suite needs the dev extra's packages).
  local files
  files=$(grep -rl "mark\.gpu" tests/model tests/service --include='test_*.py' | sort)
  echo "files: $files"
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="--strict-markers -rA" $files
}

raw_model() {
  # shellcheck disable=SC2086
  "$PY" -m benchmarks.gpu_raw --device "$DEVICE" --seconds "$RAW_SECONDS" $RAW_SPECS >"$RESULTS/raw.jsonl"
}

smi_sampler() {  # nvidia-smi every 0.5 s into RESULTS/smi.csv, in the step's group
  [ "$DEVICE" = cpu ] && return 0
  nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.memory,memory.used,clocks.sm,power.draw \
    --format=csv -lms 500 >"$RESULTS/smi.csv" &
}

service() {
  mkdir -p "$RESULTS/service"
  smi_sampler
  local smi=$!
  # shellcheck disable=SC2086
  "$PY" -m benchmarks run --scenarios chanseg $SERVE_ARGS \
    --env "CHANSEG_DEVICE=$DEVICE" "CHANSEG_PRECISION=$SERVE_PRECISION" CHANSEG_MODEL_FORMAT=torchscript $SERVE_ENV \
    --out "$RESULTS/service/serve"
  local code=$?
  [ "$DEVICE" = cpu ] || kill "$smi" 2>/dev/null
  return $code
}

auto_batch() {
  # shellcheck disable=SC2086
  "$PY" -m benchmarks.auto_batch --device "$DEVICE" --precisions $AUTO_PRECISIONS --limit "$AUTO_LIMIT" \
    --budget-s "$AUTO_BUDGET_S" >"$RESULTS/auto_batch.json"
}

agreement() {
  # shellcheck disable=SC2086
  "$PY" -m benchmarks.agreement --device "$DEVICE" --precisions $AGREEMENT_PRECISIONS \
    --images $AGREEMENT_IMAGES >"$RESULTS/agreement.json"
}

# AOTInductor builds a CUDA package's C++ with a CUDA toolkit's headers and libraries
# (torch.utils.cpp_extension: CUDA_HOME, else nvcc's, else /usr/local/cuda) and links
# -lcuda. An image with pip's CUDA wheels only has neither: then CUDA_HOME is pip's
# nvidia/cu13 (or cu12: include/cuda.h, lib/libcudart_static.a), and the driver's
# libcuda.so.1 is linked through a libcuda.so of our own on LIBRARY_PATH.
cuda_build_env() {
  if [ -z "${CUDA_HOME:-}${CUDA_PATH:-}" ] && ! command -v nvcc >/dev/null && [ ! -d /usr/local/cuda ]; then
    local home
    home=$("$PY" -c '
import glob, importlib.util, os
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations if spec else []):
    for header in sorted(glob.glob(os.path.join(root, "cu1*", "include", "cuda.h")), reverse=True):
        print(os.path.dirname(os.path.dirname(header)))
        raise SystemExit
')
    if [ -n "$home" ]; then
      export CUDA_HOME=$home
      echo "cuda_build_env: no CUDA toolkit here; CUDA_HOME=$CUDA_HOME (pip's)"
    else
      echo "cuda_build_env: no CUDA toolkit and no pip nvidia headers: a CUDA compile will fail"
    fi
  fi
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so '; then
    local driver
    driver=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 / { print $NF; exit }')
    if [ -n "$driver" ]; then
      mkdir -p "$RESULTS/cuda-link"
      ln -sf "$driver" "$RESULTS/cuda-link/libcuda.so"
      export LIBRARY_PATH=$RESULTS/cuda-link${LIBRARY_PATH:+:$LIBRARY_PATH}
      echo "cuda_build_env: -lcuda links $driver (LIBRARY_PATH)"
    else
      echo "cuda_build_env: no libcuda.so.1 known to ldconfig: a CUDA compile's link may fail"
    fi
  fi
  return 0
}

compile_package() {  # in the background, into a cache of its own
  [ "$DEVICE" = cpu ] || cuda_build_env
  CHANSEG_CACHE_DIR="$RESULTS/compile-cache" "$PY" -m model compile --device "$DEVICE" \
    --precision "$PACKAGE_PRECISION" --count "$PACKAGE_COUNT" >"$RESULTS/compile.json"
}

package() {
  # Waits for the background compile with what the step has, less what measuring takes.
  local measure_s wait_s waited=0
  measure_s=$(scaled 45)
  wait_s=$((STEP_LIMIT_S - measure_s))
  while [ ! -f "$RESULTS/compile.status" ] && [ "$waited" -lt "$wait_s" ]; do
    sleep 1
    waited=$((waited + 1))
  done
  if [ ! -f "$RESULTS/compile.status" ]; then
    echo "the compile did not finish in time (it ran during the untimed steps and ${waited} s here);" \
      "no package was measured (its log: logs/bg-compile.log)" | tee "$STEP_NOTE"
    return 4
  fi
  if [ "$(cat "$RESULTS/compile.status")" != 0 ]; then
    echo "the compile failed with status $(cat "$RESULTS/compile.status") (its log: logs/bg-compile.log)" |
      tee "$STEP_NOTE"
    tail -20 "$RESULTS/logs/bg-compile.log"
    return 5
  fi
  local path
  path=$(CHANSEG_CACHE_DIR="$RESULTS/compile-cache" "$PY" -c \
    "import sys, torch; from model.pretrained import default_package_path as p; print(p(torch.device(sys.argv[1]), sys.argv[2]))" \
    "$DEVICE" "$PACKAGE_PRECISION") || return 6
  echo "package: $path ($(du -h "$path" | cut -f1))"
  # --format package: a TorchScript file here is refused, never measured under this name.
  # shellcheck disable=SC2086
  "$PY" -m benchmarks.gpu_raw --device "$DEVICE" --model "$path" --format package --seconds "$RAW_SECONDS" \
    $PACKAGE_SPEC >"$RESULTS/package.jsonl"
}

# The steps run in processes of their own (bash -c): what they use goes with them.
export PY RESULTS DEVICE RAW_SECONDS RAW_SPECS SERVE_PRECISION SERVE_ARGS SERVE_ENV AUTO_PRECISIONS AUTO_LIMIT \
  AUTO_BUDGET_S AGREEMENT_PRECISIONS AGREEMENT_IMAGES PACKAGE_PRECISION PACKAGE_SPEC PACKAGE_COUNT TIME_SCALE
export -f scaled environment cuda_tests raw_model smi_sampler service auto_batch agreement cuda_build_env \
  compile_package package

# Sourced with GPU_CHECK_LIB=1 (the tests do): the functions above, nothing run.
if [ -n "${GPU_CHECK_LIB:-}" ]; then
  return 0 2>/dev/null || exit 0
fi

if [ "$DEVICE" != cpu ]; then
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none)" >&2
    exit 3
  fi
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch has no CUDA here ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1))" >&2
    exit 3
  fi
fi

start_run
export CHANSEG_CACHE_DIR=${CHANSEG_CACHE_DIR:-$RESULTS/cache}
trap on_signal TERM INT
for knob in DEVICE DEADLINE_S TIME_SCALE RAW_SPECS RAW_SECONDS SERVE_PRECISION SERVE_ARGS SERVE_ENV AUTO_PRECISIONS \
  AUTO_LIMIT AUTO_BUDGET_S AGREEMENT_PRECISIONS AGREEMENT_IMAGES PACKAGE_PRECISION PACKAGE_SPEC PACKAGE_COUNT; do
  echo "$knob=${!knob}"
done >"$RESULTS/plan.env"  # what benchmarks/gpu_report.py expects to find
progress "gpu_check: device $DEVICE, deadline ${DEADLINE_S} s, started $(date -u +%FT%TZ)"

background compile compile_package
step "environment" 25 environment
step "CUDA tests (pytest -m gpu)" 45 cuda_tests
pause compile STOP "stopped for the timed steps"
step "raw model (TorchScript)" 100 raw_model
step "service, TorchScript $SERVE_PRECISION" 170 service
step "auto batch size (${AUTO_PRECISIONS// /, })" 50 auto_batch
pause compile CONT resumed
step "${AGREEMENT_PRECISIONS// /, } masks against fp32" 50 agreement
# The limits above add up to 440 s: this one has the rest, at least 100 s.
step "compiled package (AOTInductor, $PACKAGE_PRECISION)" 9999 package

cleanup
progress "gpu_check: done in $(elapsed_s) s"
exit "$ANY_NOT_OK"
