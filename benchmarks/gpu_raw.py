"""The raw model at several precisions and image sets, in one process: JSON lines.

What ``benchmarks.ceiling`` measures (``Segmenter.predict`` on decoded images, one
forward pass per batch, median of repeated calls), for each ``PRECISION:SET:BATCHES``
in turn, without paying a process start, a CUDA context, a load (and its recipe
measurement) and the image set's generation for each: a precision is loaded once
and a set made once. Each result is printed as one JSON line as soon as it is
measured, so a run cut short keeps the ones it finished; a batch size that runs out
of device memory is recorded as such and the next one is tried. A precision that
does not load is a line with its error, and the exit status is 1.

    python -m benchmarks.gpu_raw --device cuda --seconds 1 \\
        fp32:png256:1,8,32,64,128,256 fp16:png256:1,8,32,64,128,256 fp16:jpeg1024:1,8
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image

import model
from benchmarks.ceiling import time_batch
from testbed.images import IMAGE_SETS


@dataclass(frozen=True)
class Spec:
    precision: str
    images: str
    batches: Tuple[int, ...]


def parse_spec(text: str) -> Spec:
    """``fp16:png256:1,8,32`` -> Spec("fp16", "png256", (1, 8, 32))."""
    try:
        precision, images, batches = text.split(":")
        spec = Spec(precision, images, tuple(int(b) for b in batches.split(",")))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PRECISION:SET:B1,B2,... ({exc})") from exc
    if precision not in model.PRECISIONS or images not in IMAGE_SETS or not spec.batches:
        raise argparse.ArgumentTypeError(
            f"{text!r}: precision one of {', '.join(model.PRECISIONS)}, set one of {', '.join(IMAGE_SETS)}"
        )
    return spec


def measure(segmenter, images: List[np.ndarray], batches: Tuple[int, ...], seconds: float) -> Dict:
    """Images/s per batch size (``time_batch``); an out-of-memory batch is noted."""
    per_batch: Dict[int, dict] = {}
    for batch in batches:
        try:
            # Three untimed calls, as the server's warm-up gives a new shape on CUDA:
            # TorchScript profiles, then fuses; cuDNN autotunes (service/warmup.py).
            per_batch[batch] = time_batch(segmenter, images, batch, seconds, untimed=3)
        except torch.OutOfMemoryError:
            per_batch[batch] = {"error": "out of device memory"}
            torch.cuda.empty_cache()
        print(f"  {segmenter.precision} batch {batch}: {per_batch[batch]}", file=sys.stderr, flush=True)
    timed = {b: v for b, v in per_batch.items() if "images_per_s" in v}
    best = max(timed, key=lambda b: timed[b]["images_per_s"]) if timed else None
    return {
        "per_batch": per_batch,
        "best_batch": best,
        "images_per_s": timed[best]["images_per_s"] if best else None,
    }


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("specs", nargs="+", type=parse_spec, metavar="PRECISION:SET:BATCHES")
    parser.add_argument("--model", help="TorchScript artifact (default: the bundled model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--format", default="torchscript", choices=["torchscript", "package"])
    parser.add_argument("--seconds", type=float, default=1.0, help="timed per batch size")
    args = parser.parse_args(argv)
    sets: Dict[str, List[np.ndarray]] = {}
    loaded: Dict[str, Tuple[object, float]] = {}  # precision -> (segmenter, seconds its load took)
    failed = 0
    for spec in args.specs:
        if spec.images not in sets:
            sets[spec.images] = [
                np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in IMAGE_SETS[spec.images]()
            ]
        if spec.precision not in loaded:
            loaded.clear()  # one precision on the device at a time
            started = time.perf_counter()
            try:
                segmenter = model.load(
                    args.model, device=args.device, precision=spec.precision, format=args.format
                )
            except model.ModelLoadError as exc:
                print(
                    json.dumps({"precision": spec.precision, "images": spec.images, "error": str(exc)}),
                    flush=True,
                )
                failed += 1
                continue
            loaded[spec.precision] = segmenter, time.perf_counter() - started
        segmenter, load_s = loaded[spec.precision]
        result = {
            "precision": spec.precision,
            "images": spec.images,
            "device": str(segmenter.device),
            "format": segmenter.format,
            "path": str(segmenter.path) if segmenter.path else None,
            "recipe": getattr(segmenter, "recipe", None),
            "load_s": round(load_s, 2),
            **measure(segmenter, sets[spec.images], spec.batches, args.seconds),
        }
        print(json.dumps(result), flush=True)
    return 1 if failed else 0  # the others were measured all the same


if __name__ == "__main__":
    raise SystemExit(main())
