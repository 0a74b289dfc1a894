"""The raw ceiling: ``Segmenter.predict`` on decoded images, no HTTP.

Reads the encoded images as a JSON list of hex strings on stdin (or makes a
set with ``--images``), decodes them once, then times ``predict`` at batch sizes 1, 2, 4 and 8 (median of repeated
calls for ``--seconds`` each) and prints JSON: images/s per batch size, the
best, the batch-1 latency, and the file it loaded. What no server on this machine can beat.

With ``--streams`` > 1 (default: what the server's ``INFERENCE_STREAMS=auto`` runs
here) each batch size is also timed as that many threads calling ``predict`` side
by side, each with its share of torch's threads (``per_batch_streams``), and the
best of both ways is the ceiling.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

import model
from model.artifact import FORMATS
from service.threads import inference_streams, stream_threads
from testbed.images import IMAGE_SETS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="artifact or compiled package (default: the bundled model)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--images", choices=list(IMAGE_SETS), help="make this set instead of reading stdin")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", *model.PRECISIONS])
    parser.add_argument(
        "--format", default="auto", choices=["auto", *FORMATS], help="as the server's MODEL_FORMAT"
    )
    parser.add_argument("--streams", type=int, help="as the server's INFERENCE_STREAMS (default: its auto)")
    args = parser.parse_args()
    encoded = IMAGE_SETS[args.images]() if args.images else [bytes.fromhex(h) for h in json.load(sys.stdin)]
    images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in encoded]
    segmenter = model.load(args.model, device=args.device, precision=args.precision, format=args.format)
    per_batch = {batch: time_batch(segmenter, images, batch, args.seconds) for batch in args.batches}
    threads = torch.get_num_threads()
    streams = args.streams or inference_streams("auto", segmenter.device, threads)
    side_by_side = {}
    if streams > 1:
        side_by_side = {
            b: _side_by_side(segmenter, images, b, streams, threads, args.seconds) for b in args.batches
        }
        for batch, rate in side_by_side.items():
            per_batch[batch]["images_per_s"] = max(per_batch[batch]["images_per_s"], rate)
    best = max(per_batch, key=lambda b: per_batch[b]["images_per_s"])
    json.dump(
        {
            "device": str(segmenter.device),
            "precision": segmenter.precision,
            "format": segmenter.format,
            # The file loaded (None: the bundled model built in memory): the harness's other servers get it.
            "path": str(segmenter.path) if segmenter.path else None,
            "per_batch": per_batch,  # the better of one call at a time and side by side
            "streams": streams,
            "per_batch_streams": side_by_side,  # images/s, ``streams`` calls side by side
            "best_batch": best,
            "images_per_s": per_batch[best]["images_per_s"],
            "predict_batch1_ms": per_batch[1]["ms"] if 1 in per_batch else None,
        },
        sys.stdout,
    )
    return 0


def time_batch(segmenter, images, batch: int, seconds: float, untimed: int = 1) -> dict:
    """``predict`` on ``batch`` of ``images`` (repeated as needed), one forward pass per
    call: ``untimed`` calls, then timed ones for ``seconds`` (at least 3). Images/s and
    milliseconds per call, from the median call."""
    sync = torch.cuda.synchronize if segmenter.device.type == "cuda" else (lambda: None)
    chunk = (images * batch)[:batch]
    for _ in range(untimed):
        segmenter.predict(chunk, batch_size=batch)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        segmenter.predict(chunk, batch_size=batch)  # one forward pass; numpy masks: the GPU is done
        sync()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return {"images_per_s": batch / median, "ms": median * 1000}


def _side_by_side(segmenter, images, batch: int, streams: int, threads: int, seconds: float) -> float:
    """Images/s with ``streams`` threads calling ``predict`` at once, as a saturated
    server's streams do: this thread and ``streams - 1`` more, each with its share of
    ``threads``."""
    chunk = (images * batch)[:batch]
    started: list = []
    barrier = threading.Barrier(streams, action=lambda: started.append(time.perf_counter()))

    def run() -> int:
        torch.set_num_threads(stream_threads(threads, streams))
        segmenter.predict(chunk, batch_size=batch)
        barrier.wait()
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            segmenter.predict(chunk, batch_size=batch)
            done += batch
        return done

    with ThreadPoolExecutor(streams - 1) as others:
        futures = [others.submit(run) for _ in range(streams - 1)]
        done = run() + sum(f.result() for f in futures)
        elapsed = time.perf_counter() - started[0]
    torch.set_num_threads(threads)
    return done / elapsed


if __name__ == "__main__":
    raise SystemExit(main())
