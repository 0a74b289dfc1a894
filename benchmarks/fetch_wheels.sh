#!/usr/bin/env bash
# Fetches the wheels carried to the GPU machine (benchmarks/gpu_wheels.txt: pinned,
# with their hashes) into .whl/ (ignored by git), for CPython 3.12 on manylinux
# x86_64 whatever this machine runs; the GPU machine has no network. 9.6 MiB.
#
#   bash benchmarks/fetch_wheels.sh [DIR]        (DIR: .whl by default)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
rm -f "$DIR"/*.whl  # exactly the pinned set: nothing left from an earlier one
"$PY" -m pip download --quiet --disable-pip-version-check --require-hashes --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$DIR" -r benchmarks/gpu_wheels.txt 2> >(grep -v "^WARNING: Location" >&2)
wanted=$(grep -c '^[a-z]' benchmarks/gpu_wheels.txt)
got=$(find "$DIR" -maxdepth 1 -type f -name '*.whl' | wc -l)
if [ "$got" -ne "$wanted" ]; then
  echo "fetch_wheels: $got wheels in $DIR, expected $wanted" >&2
  exit 1
fi
echo "$got wheels in $DIR, $(du -ch "$DIR"/*.whl | tail -1 | cut -f1) in all"
