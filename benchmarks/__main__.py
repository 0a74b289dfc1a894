"""``python -m benchmarks run ...``: the benchmark harness (see ``benchmarks.harness``)."""

from __future__ import annotations

import sys

from benchmarks.harness import main

USAGE = "usage: python -m benchmarks run [options]   (python -m benchmarks run --help)"

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "run":
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[2:]))
