"""What each mask format costs: bytes and encode time for one image's answer at
256x256 and 2048x2048, from the bundled model's prediction on a synthetic image.

``python -m benchmarks.formats [--repeat 7]``

Formats: the palette PNG (``/predict``'s ``mask_png``), COCO RLE
(``format=rle``, the JSON text of ``mask_rle``), the confidence map (8-bit grey
PNG, ``format=confidence``), the connected regions (``regions``, JSON) and the
pixels per class (``class_pixels``, JSON's other per-image detail). Each
starts from the labels (or confidence) at the model's input size, as the server's
encoder does: the nearest upsampling to the image's size is part of the time.
Medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, List

import torch

import model
from model.data import synthetic_sample
from model.predictor import top_probability
from model.regions import regions
from model.visualize import grey_png_bytes, mask_png_bytes
from service.pipeline import mask_rles


def timed(fn: Callable[[], bytes], repeat: int) -> tuple:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return len(out), statistics.median(times) * 1000


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    seg = model.load(device="cpu")
    names, classes = seg.config.class_names, seg.config.num_classes
    image = synthetic_sample(5, 0, tuple(seg.config.input_size)).image
    with torch.inference_mode():
        logits = seg.logits([seg.prepare(image)])
    labels, confidence = seg.labels(logits)[0], top_probability(logits)[0]
    print(f"model {seg.name} {seg.version} ({seg.precision}, {seg.format}); median of {args.repeat}")
    print(f"{'size':>10} {'format':<16} {'bytes':>8} {'ms':>8}")
    for side in (256, 2048):
        size = (side, side)
        formats = {
            "mask PNG": lambda size=size: mask_png_bytes(seg.restore(labels, size), classes),
            "RLE (JSON)": lambda size=size: json.dumps(mask_rles(seg, labels, size)).encode(),
            "confidence PNG": lambda size=size: grey_png_bytes(seg.restore(confidence, size)),
            "regions (JSON)": lambda size=size: json.dumps(regions(labels.numpy(), size, names)[0]).encode(),
            "class pixels": lambda size=size: json.dumps(
                seg.class_counts(labels, size, classes).tolist()
            ).encode(),
        }
        for name, fn in formats.items():
            nbytes, ms = timed(fn, args.repeat)
            print(f"{f'{side}x{side}':>10} {name:<16} {nbytes:>8} {ms:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
