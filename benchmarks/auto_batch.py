"""The server's ``MAX_BATCH_SIZE=auto`` measurement, as a table: JSON on stdout.

``service.warmup.measure_throughput`` (what the server runs at warm-up: the
search over 1, 2, 4, ... then the sizes timed again in turns) for each precision,
with the batch size ``choose_batch_size`` takes from it and the load's recipe. A
precision that does not load or runs out of memory gets its error, the others are
measured all the same, and the exit status is 1.

    python -m benchmarks.auto_batch --device cuda --precisions fp16 fp32 --limit 512 --budget-s 20
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List

import model
from service.warmup import choose_batch_size, measure_throughput


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="TorchScript artifact (default: the bundled model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", nargs="+", default=["fp16", "fp32"], choices=list(model.PRECISIONS))
    parser.add_argument("--limit", type=int, default=512, help="the largest batch size tried")
    parser.add_argument("--budget-s", type=float, default=20.0, help="per precision, as AUTO_BATCH_BUDGET_S")
    args = parser.parse_args(argv)
    # The search's own lines (each size as it is timed) on stderr: a run cut short shows how far it got.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    out, failed = {}, 0
    for precision in args.precisions:
        try:
            segmenter = model.load(args.model, device=args.device, precision=precision, format="torchscript")
            throughput, _, _ = measure_throughput(segmenter, limit=args.limit, budget_s=args.budget_s)
        except (model.ModelLoadError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            out[precision], failed = {"error": f"{type(exc).__name__}: {exc}"}, failed + 1
            print(f"auto batch, {precision}: {out[precision]['error']}", file=sys.stderr, flush=True)
            continue
        out[precision] = {
            "device": str(segmenter.device),
            "recipe": getattr(segmenter, "recipe", None),
            "chooses": choose_batch_size(throughput),
            "images_per_s": throughput,
        }
        print(f"auto batch, {precision}: chooses {out[precision]['chooses']}", file=sys.stderr, flush=True)
        del segmenter
    json.dump(out, sys.stdout, indent=1)
    print()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
