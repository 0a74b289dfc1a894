#!/usr/bin/env bash
# The one command on the lent GPU machine (docs/performance.md, "On a GPU"): from the repository
# root, with the wheels of benchmarks/fetch_wheels.sh carried in .whl/,
#
#   bash benchmarks/gpu_device_run.sh
#
# That machine has a bare image: its python3 (3.12) with torch, numpy, pillow, httpx,
# prometheus-client, pytest, grpcio, ... but no fastapi, uvicorn, pydantic, ..., no
# .venv and no network. This installs the carried wheels into a folder of their own
# (pip --target, put on PYTHONPATH; servers.py passes PYTHONPATH on to the servers),
# runs benchmarks/gpu_check.sh with its results outside $OUT, and leaves in $OUT
# (at most 8 files of 16 MiB come back) summary.txt, the figures' JSON tables and
# one archive of the rest (benchmarks/gpu_report.py pack). summary.txt is written
# into $OUT after every step as well, so a run cut short still returns its progress.
#
# Limits: the command may run 600 s; gpu_check.sh has DEADLINE_S (540 s) and is
# stopped (SIGTERM, then SIGKILL) at HARD_LIMIT_S (570 s) from the start, whatever
# happens; installing and packing take a few seconds.
# Exit status: gpu_check.sh's (0: every step ok), or 3 when nothing could run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:?"set OUT to the folder that comes back"}
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-/tmp/chanseg-gpu-results}
SITE=${SITE:-/tmp/chanseg-site}
HARD_LIMIT_S=${HARD_LIMIT_S:-570}
STARTED=$SECONDS

case "$(realpath -m "$RESULTS")/" in
"$(realpath -m "$OUT")"/*) echo "gpu_device_run: RESULTS must be outside OUT" >&2; exit 3 ;;
esac
rm -rf "$RESULTS"
mkdir -p "$RESULTS/logs" "$OUT"
echo "gpu_device_run: started $(date -u +%FT%TZ); if this is all that came back, the run was cut before its first step ended" \
  >"$OUT/summary.txt"

wheels=(.whl/*.whl)
if [ -e "${wheels[0]}" ]; then
  echo "== installing ${#wheels[@]} carried wheels into $SITE"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}" >"$RESULTS/logs/wheels.log" 2>&1
  else  # no pip in the image: a wheel is a zip of what goes into site-packages
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$SITE" "${wheels[@]}" >"$RESULTS/logs/wheels.log" 2>&1
  fi
  if [ $? -ne 0 ]; then
    echo "gpu_device_run: installing the carried wheels failed:" >&2
    tail -20 "$RESULTS/logs/wheels.log" >&2  # gpu_check.sh runs all the same: its steps say what is missing
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
else
  echo "== no wheels in .whl/ (benchmarks/fetch_wheels.sh fetches them): the image's packages only"
fi

RUN_ID=gpu-$$-$(date +%s)
PYTHON=$PY RESULTS=$RESULTS PROGRESS_COPY=$OUT/summary.txt RUN_ID=$RUN_ID \
  timeout -k 5 $((HARD_LIMIT_S - (SECONDS - STARTED))) bash benchmarks/gpu_check.sh
code=$?
echo "== gpu_check.sh exited with $code after $((SECONDS - STARTED)) s"
# After a hard stop (124, 137) its cleanup may not have run: what its steps started.
for pid in $(grep -lzsx -- "GPU_CHECK_RUN=$RUN_ID" /proc/[0-9]*/environ | cut -d/ -f3); do
  kill -CONT "$pid" 2>/dev/null
  kill -KILL "$pid" 2>/dev/null && echo "   killed $pid, left running by gpu_check.sh"
done

if ! "$PY" -m benchmarks.gpu_report pack "$RESULTS" "$OUT"; then
  # The progress lines are the summary then; the logs still come back.
  { cat "$RESULTS/progress.txt"; echo "gpu_report pack failed: the figures are in $RESULTS only"; } >"$OUT/summary.txt"
  tar -czf "$OUT/results.tar.gz" -C "$RESULTS" --exclude=./cache --exclude=./compile-cache . 2>/dev/null
fi
echo "== in $OUT after $((SECONDS - STARTED)) s:"
ls -l "$OUT"
echo
cat "$OUT/summary.txt"
exit "$code"
