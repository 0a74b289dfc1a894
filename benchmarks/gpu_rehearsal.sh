#!/usr/bin/env bash
# `make gpu-rehearsal`: the GPU machine's run, rehearsed on this CPU.
#
# 1. An environment like the GPU machine's image (kept in GPU_REHEARSAL_CACHE,
#    ~/.cache/chanseg-gpu-rehearsal: built once, ~2 minutes): Python 3.12, the
#    torch the image has (torch 2.11.0 from PyPI: the CUDA 13.0 build, 2.6 GB with its
#    nvidia-* libraries; it imports and runs on a CPU, and no CPU-only 2.11 wheel for
#    cp312 is reachable here) and the image's other packages, nothing else: no
#    fastapi, uvicorn, pydantic, ... and no .venv.
# 2. The carried wheels (benchmarks/fetch_wheels.sh into .whl/).
# 3. A copy of what the GPU machine gets: the files git tracks or does not ignore,
#    plus .whl/ (at most 64 MiB in all).
# 4. benchmarks/gpu_device_run.sh there, as docs/performance.md runs it, with the CUDA steps
#    on `cpu` (the reduced precision is bf16 where this CPU has it, else fp32;
#    fp16 on a CPU is refused), the workloads made small and the time limits
#    (the deadline, each step's) times TIME_SCALE, 1.5 by default.
# 5. Checks: it exited 0; every step ran and is `ok`, and each one's figures are in
#    what came back; no process it started is still running; what came back fits the
#    GPU machine's limits (at most 8 plain files of at most 16 MiB, names of letters,
#    digits, '.', '_' and '-', at most 2 folders deep).
# Exit status 0 when every check passed. KEEP=1 keeps the work folder.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
STARTED=$SECONDS
CACHE=${GPU_REHEARSAL_CACHE:-$HOME/.cache/chanseg-gpu-rehearsal}
PY312=
for candidate in ${GPU_REHEARSAL_PYTHON:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
  if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    PY312=$candidate
    break
  fi
done
[ -n "$PY312" ] || { echo "no Python 3.12 found: set GPU_REHEARSAL_PYTHON" >&2; exit 2; }
TORCH=torch==2.11.0
IMAGE_PACKAGES="numpy pillow httpx prometheus-client pytest grpcio protobuf scipy psutil requests pyyaml"
ENV=$CACHE/env
TIME_SCALE=${TIME_SCALE:-1.5}  # a shared 2-core VM's pace varies: its steps get half as long again
failures=()
fail() { failures+=("$*"); echo "REHEARSAL CHECK FAILED: $*" >&2; }
say() { echo "[rehearsal $((SECONDS - STARTED)) s] $*"; }

# --- 1. the image ---------------------------------------------------------------
stamp="$("$PY312" --version 2>&1) $TORCH $IMAGE_PACKAGES"
if [ "$(cat "$ENV/.stamp" 2>/dev/null)" != "$stamp" ]; then
  say "building the image's environment in $ENV (once: ~2 minutes, 2.6 GB of torch from PyPI)"
  rm -rf "$ENV"
  "$PY312" -m venv "$ENV" || { echo "making a venv with $PY312 failed" >&2; exit 2; }
  mkdir -p "$CACHE/wheels"
  # torch and its nvidia-* libraries once into the cache, then installed from there.
  "$ENV/bin/python" -m pip download --quiet --disable-pip-version-check -d "$CACHE/wheels" "$TORCH" \
    2> >(grep -v "^WARNING: Location" >&2) || { echo "downloading $TORCH failed" >&2; exit 2; }
  # shellcheck disable=SC2086
  nice "$ENV/bin/python" -m pip install --quiet --disable-pip-version-check --find-links "$CACHE/wheels" \
    "$TORCH" $IMAGE_PACKAGES 2> >(grep -v "^WARNING: Location" >&2) || { echo "installing failed" >&2; exit 2; }
  echo "$stamp" >"$ENV/.stamp"
fi
"$ENV/bin/python" - <<'PY' || fail "the environment is not like the GPU machine's image"
import importlib.util, sys, torch
assert sys.version_info[:2] == (3, 12), sys.version
assert torch.__version__.startswith("2.11."), torch.__version__
present = [m for m in ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "multipart",
                       "httptools", "asgi_lifespan", "tritonclient", "safetensors", "uvloop")
           if importlib.util.find_spec(m)]
assert not present, f"the image lacks these, the rehearsal's environment has them: {present}"
print(f"environment: Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA build {torch.version.cuda}, "
      f"no GPU: {not torch.cuda.is_available()})")
PY

# --- 2. the carried wheels, 3. the copy -----------------------------------------
WORK=$(mktemp -d /tmp/chanseg-rehearsal-XXXXXX)
say "fetching the carried wheels"
bash benchmarks/fetch_wheels.sh .whl || fail "fetching the wheels"
mkdir -p "$WORK/tree"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | tar --null -T - -cf - | tar -C "$WORK/tree" -xf -
cp -r .whl "$WORK/tree/.whl"
tree_bytes=$(du -sb "$WORK/tree" | cut -f1)
say "the tree and the carried wheels: $((tree_bytes / 1024)) KiB"
[ "$tree_bytes" -le $((64 * 2**20)) ] || fail "the tree and the wheels are $tree_bytes bytes, over 64 MiB"

# --- 4. the run ---------------------------------------------------------------------
reduced=fp32
grep -qwE "avx512_bf16|amx_bf16" /proc/cpuinfo && reduced=bf16
scaled() { awk -v s="$1" -v f="$TIME_SCALE" 'BEGIN { printf "%d", s * f + 0.5 }'; }
TAG=CHANSEG_REHEARSAL=$$-$(date +%s)
say "running benchmarks/gpu_device_run.sh on cpu (reduced precision $reduced, TIME_SCALE $TIME_SCALE)"
run_started=$SECONDS
(
  cd "$WORK/tree" && exec env -i "$TAG" HOME="$HOME" LANG=C.UTF-8 PATH="$ENV/bin:/usr/local/bin:/usr/bin:/bin" \
    OUT="$WORK/out" RESULTS="$WORK/results" SITE="$WORK/site" HARD_LIMIT_S="$(scaled 570)" \
    TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-cache" TRITON_CACHE_DIR="$WORK/triton-cache" \
    DEVICE=cpu TIME_SCALE="$TIME_SCALE" RAW_SECONDS=0.3 \
    RAW_SPECS="fp32:png256:1,4 $reduced:png256:1,4 $reduced:jpeg1024:1" \
    SERVE_PRECISION="$reduced" SERVE_ENV="CHANSEG_MAX_BATCH_SIZE=4" \
    SERVE_ARGS="--images png256 jpeg1024 --concurrency 1 4 --jpeg-concurrency 2 --rates --window 3 --warmup 1 --max-windows 1 --ceiling-seconds 0.3 --ceiling-batches 1 2" \
    AUTO_PRECISIONS="$reduced fp32" AUTO_LIMIT=4 AUTO_BUDGET_S=3 \
    AGREEMENT_PRECISIONS="$reduced" AGREEMENT_IMAGES=jpeg1024 \
    PACKAGE_PRECISION=fp32 PACKAGE_SPEC=fp32:png256:1,4 PACKAGE_COUNT=8 \
    setsid bash benchmarks/gpu_device_run.sh
) 2>&1 | sed -u "s/^/  | /"
code=${PIPESTATUS[0]}
run_s=$((SECONDS - run_started))
say "gpu_device_run.sh exited with $code after $run_s s"
[ "$code" -eq 0 ] || fail "gpu_device_run.sh exited with $code (not every step was ok)"

# --- 5. the checks ------------------------------------------------------------------
sleep 1
left=$(grep -lzsx -- "$TAG" /proc/[0-9]*/environ | cut -d/ -f3 | tr '\n' ' ')
if [ -n "${left// /}" ]; then
  fail "still running after the run: $(for p in $left; do echo -n "$p $(cat /proc/"$p"/comm 2>/dev/null); "; done)"
  # shellcheck disable=SC2086
  kill -KILL $left 2>/dev/null
fi
"$ENV/bin/python" - "$WORK/out" "$reduced" <<'PY' || fail "what came back (above)"
import json, re, sys
from pathlib import Path
out, reduced = Path(sys.argv[1]), sys.argv[2]
problems = []
entries = list(out.rglob("*"))
files = [p for p in entries if p.is_file() and not p.is_symlink()]
for p in entries:
    rel = p.relative_to(out)
    if p.is_symlink() or not (p.is_file() or p.is_dir()):
        problems.append(f"{rel}: not a plain file")
    if not all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts):
        problems.append(f"{rel}: a name with other characters")
    if len(rel.parts) - 1 > 2:
        problems.append(f"{rel}: more than 2 folders deep")
if len(files) > 8:
    problems.append(f"{len(files)} files, at most 8 come back")
for p in files:
    if p.stat().st_size > 16 * 2**20:
        problems.append(f"{p.name}: {p.stat().st_size} bytes, over 16 MiB")
print("came back: " + ", ".join(f"{p.name} ({p.stat().st_size / 1024:.1f} KiB)" for p in sorted(files)))
expected = ["environment", "cuda_tests", "raw_model", "service", "auto_batch", "agreement", "package"]
steps = json.loads((out / "steps.json").read_text())
for s in steps:
    print(f"  step {s['id']} {s['name']}: {s['status']} ({s['seconds']} s of {s['limit']} s) {s['note']}")
if [s["key"] for s in steps] != expected:
    problems.append(f"steps run: {[s['key'] for s in steps]}, expected {expected}")
problems += [f"step {s['name']}: {s['status']} {s['note']}" for s in steps if s["status"] != "ok"]
# Each ok step's figures came back (an `ok` with nothing behind it would be a lie).
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None
raw = load("raw.json") or []
if sorted((r["precision"], r["images"]) for r in raw if "per_batch" in r) != sorted(
        [("fp32", "png256"), (reduced, "png256"), (reduced, "jpeg1024")]):
    problems.append(f"raw.json: {raw}")
service = load("service.json") or {}
rows = service.get("rows", [])
if len(rows) != 3 or any(r["ok"] == 0 or r["errors"] for r in rows):
    problems.append(f"service.json rows: {rows}")
auto = load("auto_batch.json") or {}
if sorted(auto) != sorted({reduced, "fp32"}) or any(not a.get("images_per_s") for a in auto.values()):
    problems.append(f"auto_batch.json: {auto}")
agreement = (load("agreement.json") or {}).get("agreement", {})
if not agreement.get(reduced, {}).get("jpeg1024", {}).get("mean", 0) > 0.9:
    problems.append(f"agreement.json: {agreement}")
package = load("package.json") or {}
if package.get("compile_status") != "0" or not any(r.get("format") == "package" for r in package.get("speed", [])):
    problems.append(f"package.json: {package}")
summary = (out / "summary.txt").read_text()
if "Missing figures:\n  none" not in summary:
    problems.append("summary.txt lists missing figures")
for p in problems:
    print("  PROBLEM: " + p)
sys.exit(1 if problems else 0)
PY

echo
sed 's/^/  summary.txt | /' "$WORK/out/summary.txt" 2>/dev/null | head -80
total=$((SECONDS - STARTED))
if [ "${KEEP:-0}" = 1 ] || [ "${#failures[@]}" -gt 0 ]; then
  say "kept: $WORK"
else
  rm -rf "$WORK"
fi
if [ "${#failures[@]}" -gt 0 ]; then
  say "FAILED (${#failures[@]} checks) in $total s: ${failures[*]}"
  exit 1
fi
say "passed in $total s (the device run itself: $run_s s)"
