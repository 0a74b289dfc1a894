"""Masks in reduced precision against fp32, on real-sized images.

For each precision the device runs, the fraction of pixels whose class equals the
fp32 mask's, per image set (the full-size masks a client gets back, so a
disagreement at the input size counts as often as upsampling repeats it), and
the worst image. JSON on stdout.

    python -m benchmarks.agreement --device cuda --precisions fp16 bf16
"""

from __future__ import annotations

import argparse
import io
import json
import sys

import numpy as np
from PIL import Image

import model
from testbed.images import IMAGE_SETS


def agreement(reference, other, images) -> dict:
    """Per-pixel agreement of ``other``'s masks with ``reference``'s over ``images``."""
    fractions = [float((reference.predict(im) == other.predict(im)).mean()) for im in images]
    return {"mean": float(np.mean(fractions)), "worst": float(min(fractions)), "images": len(images)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="TorchScript artifact (default: the bundled model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"])
    parser.add_argument("--images", nargs="+", choices=list(IMAGE_SETS), default=["jpeg1024", "photo12mp"])
    args = parser.parse_args()
    sets = {
        name: [Image.open(io.BytesIO(b)).convert("RGB") for b in IMAGE_SETS[name]()] for name in args.images
    }
    fp32 = model.load(args.model, device=args.device, precision="fp32", format="torchscript")
    out = {"device": str(fp32.device), "reference": "fp32", "agreement": {}}
    for precision in args.precisions:
        try:
            other = model.load(args.model, device=args.device, precision=precision, format="torchscript")
        except model.ModelLoadError as exc:
            out["agreement"][precision] = {"error": str(exc)}
            continue
        out["agreement"][precision] = {name: agreement(fp32, other, images) for name, images in sets.items()}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
