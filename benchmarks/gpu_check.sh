#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in under 8 minutes: the CUDA tests, the raw
# model at fp32/fp16/bf16 as TorchScript and as compiled packages (torch.export +
# AOTInductor, compiled here for this GPU), and the service (chanseg, default
# batching) at fp32, fp16 and its compiled package over a short concurrency sweep. Figures land in $OUT (default
# benchmarks/results/gpu); put them in the README with the GPU's name.
#
#   benchmarks/gpu_check.sh            (after `make install` with a CUDA torch:
#                                       make TORCH_SPEC='torch==2.13.0 --index-url ...cu128' install)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu}

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none)" >&2
  exit 3
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch has no CUDA here ($("$PY" -c 'import torch; print(torch.__version__)')); install a CUDA build" >&2
  exit 3
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

echo "== CUDA tests"
timeout 120 "$PY" -m pytest -q -m gpu tests/model | tail -3 | tee -a "$OUT/gpu.txt"

echo "== raw model (predict on decoded 256x256 PNGs and 1024x1024 JPEGs)"
for precision in fp32 fp16 bf16; do
  for images in png256 jpeg1024; do
    timeout 60 "$PY" -m benchmarks.ceiling --device cuda --precision "$precision" --images "$images" \
      --batches 1 8 32 --seconds 2 > "$OUT/ceiling-$precision-$images.json"
    echo "$precision $images: $(cat "$OUT/ceiling-$precision-$images.json")" | tee -a "$OUT/gpu.txt"
  done
done

echo "== compiled packages for this GPU (python -m model compile: each precision, held-out mIoU, the choice)"
export CHANSEG_CACHE_DIR=${CHANSEG_CACHE_DIR:-$OUT/cache}
timeout 400 "$PY" -m model compile --device cuda --precision auto --count 32 > "$OUT/compile.json"
tee -a "$OUT/gpu.txt" < "$OUT/compile.json"
for precision in fp32 fp16 bf16; do
  package=$("$PY" -c "import torch; from model.pretrained import default_package_path as p; print(p(torch.device('cuda'), '$precision'))")
  [ -f "$package" ] || continue
  timeout 60 "$PY" -m benchmarks.ceiling --device cuda --model "$package" --images png256 \
    --batches 1 8 32 --seconds 2 > "$OUT/ceiling-package-$precision.json"
  echo "package $precision png256: $(cat "$OUT/ceiling-package-$precision.json")" | tee -a "$OUT/gpu.txt"
done

echo "== service (chanseg default batching, closed loop c1/16/64, 2 s windows)"
for run in torchscript:fp32 torchscript:fp16 auto:auto; do  # auto:auto: the package chosen above
  format=${run%%:*} precision=${run##*:}
  timeout 150 "$PY" -m benchmarks run --quick --scenarios chanseg --images png256 jpeg1024 --rates \
    --env CHANSEG_DEVICE=cuda "CHANSEG_PRECISION=$precision" "CHANSEG_MODEL_FORMAT=$format" \
    --out "$OUT/serve-$format-$precision" | tail -20 | tee -a "$OUT/gpu.txt"
done
echo "written: $OUT/"
