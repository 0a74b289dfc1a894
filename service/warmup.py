"""Warm-up and the choice of ``MAX_BATCH_SIZE=auto``, measured on the actual device.

On a CPU with glibc malloc batch 1 measured fastest per image, on a GPU large
batches win (see README): no fixed default serves both, so the server
measures throughput per batch size at start-up and takes the smallest batch
size within ``tolerance`` of the best (smaller batches wait less to fill).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Dict, List

import torch

log = logging.getLogger("chanseg.warmup")

__all__ = ["choose_batch_size", "measure_throughput", "warm_up", "warmup_sizes"]


def choose_batch_size(throughput: Dict[int, float], tolerance: float = 0.05) -> int:
    """Smallest batch size whose images/s is within ``tolerance`` of the best."""
    if not throughput:
        raise ValueError("no measurements")
    best = max(throughput.values())
    return min(b for b, ips in throughput.items() if ips >= (1 - tolerance) * best)


def _dummy(segmenter, batch: int) -> List[torch.Tensor]:
    h, w = segmenter.config.input_size
    gen = torch.Generator().manual_seed(batch)
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen) for _ in range(batch)]


def _sync(segmenter) -> None:
    if segmenter.device.type == "cuda":
        torch.cuda.synchronize(segmenter.device)


def measure_throughput(segmenter, limit: int, budget_s: float = 15.0, runs: int = 2) -> Dict[int, float]:
    """Images/s per batch size 1, 2, 4, ... up to ``limit`` (median of ``runs``).

    Stops early when throughput falls 10% below the best so far, or when the
    time budget is spent."""
    results: Dict[int, float] = {}
    started = time.perf_counter()
    batch = 1
    while batch <= limit:
        images = _dummy(segmenter, batch)
        segmenter.infer(images)  # first call of a shape: profiling, allocation
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            segmenter.infer(images)
            _sync(segmenter)
            times.append(time.perf_counter() - t)
        results[batch] = batch / statistics.median(times)
        log.info("warm-up: batch %d -> %.1f images/s", batch, results[batch])
        if results[batch] < 0.9 * max(results.values()) or time.perf_counter() - started > budget_s:
            break
        batch = batch * 2 if batch * 2 <= limit or batch == limit else limit
    return results


def warmup_sizes(max_batch_size: int) -> List[int]:
    sizes = {1, max_batch_size}
    b = 2
    while b < max_batch_size:
        sizes.add(b)
        b *= 2
    return sorted(sizes)


def warm_up(segmenter, max_batch_size: int, rounds: int = 2) -> Dict[int, float]:
    """A few dummy batches of each size the batcher will commonly run; returns the
    seconds of each size's last round (the watchdog's measure of a normal batch)."""
    seconds: Dict[int, float] = {}
    for batch in warmup_sizes(max_batch_size):
        images = _dummy(segmenter, batch)
        for _ in range(rounds):
            t = time.perf_counter()
            segmenter.infer(images)
            _sync(segmenter)
            seconds[batch] = time.perf_counter() - t
    return seconds
