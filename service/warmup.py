"""Warm-up and the choice of ``MAX_BATCH_SIZE=auto``, measured on the actual device
once, then reused.

On a CPU every batch size runs at about the same images/s, on a GPU large
batches win (see docs/performance.md): no fixed default serves both, so the server measures
throughput per batch size (1, 2, 4, ...) and takes the smallest size within
``tolerance`` of the best (smaller batches wait less to fill). It stops once the
curve has clearly peaked (two sizes in a row no better than the best) or its
time budget (``AUTO_BATCH_BUDGET_S``) is spent, then times the sizes it found
again in turns, so that the machine's drift does not pass for a difference.

The answer only changes with the device, the model, the precision, torch,
chanseg, the allocator and the way it is measured (``METHOD``), so it is kept in
the cache directory under a key of all of them (:class:`MeasurementCache`) and
reused on the next start: a restart on the same kind of machine only warms up
the chosen sizes.
``REMEASURE_BATCH_SIZE`` forces a fresh measurement.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import model
from model.artifact import written_atomically
from model.hardware import device_description
from model.pretrained import cache_places

from .resources import allocator

log = logging.getLogger("chanseg.warmup")

__all__ = [
    "BatchChoice",
    "MeasurementCache",
    "choose_batch_size",
    "measure_throughput",
    "measurement_key",
    "warm_up",
    "warmup_sizes",
]

TOLERANCE = 0.10  # the noise between runs of the same thing on a shared machine (docs/performance.md)
ROUNDS = 3  # timed calls per size taken in turns after the search (measure_throughput)
# How a size is measured and chosen: part of the cache key, so that a choice made
# the old way (sizes timed one after another, before ROUNDS) is measured again.
METHOD = f"search, {ROUNDS} rounds in turns, within {TOLERANCE:g} of the best, kept when the curve was seen"


@dataclass
class BatchChoice:
    """The batch size the server runs, and where it came from."""

    max_batch_size: int
    source: str  # "measured" (at this start), "reused" (from the cache) or "setting"
    throughput: Dict[int, float] = field(default_factory=dict)  # images/s per measured size
    measured_at: Optional[str] = None  # ISO time of the measurement
    # False when the measurement's time budget ran out before the curve was seen (the sizes
    # were still getting faster): such a choice is not kept, and the next start measures again.
    complete: bool = True


def choose_batch_size(throughput: Dict[int, float], tolerance: float = TOLERANCE) -> int:
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


def _untimed_calls(segmenter) -> int:
    # Calls per new shape before times mean anything: TorchScript's profiling
    # executor records a shape on its first call and optimises (fuses kernels) on
    # the second, so a size timed after one call looks slower than it is (and
    # batch 2 "loses" to batch 1); cuDNN autotunes each shape once with
    # cudnn.benchmark on. On this CPU the first call was ~20% slow, the second normal.
    return 3 if segmenter.device.type == "cuda" else 2


def _time(segmenter, images: List[torch.Tensor]) -> float:
    t = time.perf_counter()
    segmenter.infer(images)
    _sync(segmenter)
    return time.perf_counter() - t


def measure_throughput(
    segmenter,
    limit: int,
    budget_s: float = 10.0,
    runs: int = 3,
    tolerance: float = TOLERANCE,
    rounds: int = ROUNDS,
) -> Tuple[Dict[int, float], Dict[int, float], bool]:
    """Images/s per batch size 1, 2, 4, ... up to ``limit``, each size's batch time in
    seconds, and whether the curve was seen (the search reached ``limit`` or the peak,
    rather than running out of ``budget_s`` while the sizes still got faster).

    First the search: each size gets the untimed calls a new shape needs, then
    ``runs`` timed ones (median); it stops when the curve has clearly peaked (two
    sizes in a row no more than ``tolerance`` better than the best so far: one dip
    alone never stops it), or when ``budget_s`` is spent. Then, while the budget
    lasts, ``rounds`` rounds that time each size found once, in turns (1, 2, 4, 1,
    2, 4, ...), and those rounds' medians are the answer: a shared machine's speed
    drifts by tens of percent within seconds, and sizes timed one after another
    carry that drift as a difference between them (seen here: batch 1 timed at 24
    images/s and batch 2 at 19, one after the other; in turns, minutes later, 19.6
    and 22.4)."""
    searched: Dict[int, float] = {}
    started = time.perf_counter()
    best, since_best, batch, complete = 0.0, 0, 1, False
    while batch <= limit:
        images = _dummy(segmenter, batch)
        for _ in range(_untimed_calls(segmenter)):
            segmenter.infer(images)
        searched[batch] = statistics.median(_time(segmenter, images) for _ in range(runs))
        throughput = batch / searched[batch]
        log.info("measuring: batch %d -> %.1f images/s", batch, throughput)
        if throughput > (1 + tolerance) * best:
            best, since_best = throughput, 0
        else:
            best, since_best = max(best, throughput), since_best + 1
        if since_best >= 2 or batch == limit:
            complete = True
            break
        if time.perf_counter() - started > budget_s:
            break
        batch = batch * 2 if batch * 2 <= limit or batch == limit else limit
    in_turns: Dict[int, List[float]] = {b: [] for b in searched}  # always holds batch 1
    while len(in_turns[1]) < rounds and len(searched) > 1 and time.perf_counter() - started <= budget_s:
        for b in in_turns:
            in_turns[b].append(_time(segmenter, _dummy(segmenter, b)))
    done = len(in_turns[1])
    seconds = {b: statistics.median(in_turns[b]) if done else searched[b] for b in searched}
    if done:
        shown = ", ".join(f"batch {b} -> {b / t:.1f} images/s" for b, t in seconds.items())
        log.info("measuring in turns (%d rounds): %s", done, shown)
    return {b: b / t for b, t in seconds.items()}, seconds, complete


def _common_sizes(max_batch_size: int) -> List[int]:
    sizes, b = {1, max_batch_size}, 2
    while b < max_batch_size:
        sizes.add(b)
        b *= 2
    return sorted(sizes)


def warmup_sizes(max_batch_size: int) -> List[int]:
    """Every batch size the batcher can form, the common ones first (1, the powers
    of two, the largest), so that a time budget cut short still leaves those warm."""
    common = _common_sizes(max_batch_size)
    return common + [b for b in range(1, max_batch_size + 1) if b not in common]


def warm_up(
    segmenter, max_batch_size: int, skip: Optional[Dict[int, float]] = None, budget_s: float = 10.0
) -> Dict[int, float]:
    """Run each batch size the batcher can form until it is warm (a new shape's
    untimed calls, then one timed): on the first request of an odd size nothing is
    compiled, profiled or autotuned. Returns each common size's batch time in
    seconds (the watchdog's measure of a normal batch). Sizes in ``skip`` (already
    measured, so already warm) keep their times. The powers of two and the largest
    size are always warmed; the other sizes while ``budget_s`` lasts (each size
    costs its batch time a few times: cheap on a GPU, seconds for large batches on
    a CPU, where an odd size's first call is only ~20% slow)."""
    seconds: Dict[int, float] = dict(skip or {})
    started, skipped = time.perf_counter(), 0
    for batch in warmup_sizes(max_batch_size):
        if batch in seconds:
            continue
        if not _in_budget(batch, max_batch_size, started, budget_s):
            skipped += 1
            continue
        seconds[batch] = warm_batch(segmenter, batch)
    if skipped:
        log.info(
            "warm-up: %d odd batch size(s) left cold (the %.0f s warm-up budget was spent)", skipped, budget_s
        )
    return _common_times(seconds, max_batch_size)


async def warm_up_in_turns(segmenter, max_batch_size: int, budget_s: float, run) -> Dict[int, float]:
    """:func:`warm_up` with each forward pass a job of its own through ``run(fn, *args)``
    (the inference thread's queue, where a new version warms up while another serves):
    batches queued meanwhile wait for one warm-up pass at most, not for all of them."""
    seconds: Dict[int, float] = {}
    started = time.perf_counter()
    for batch in warmup_sizes(max_batch_size):
        if _in_budget(batch, max_batch_size, started, budget_s):
            images = _dummy(segmenter, batch)
            for _ in range(_untimed_calls(segmenter)):
                await run(segmenter.infer, images)
            seconds[batch] = await run(_time, segmenter, images)
    return _common_times(seconds, max_batch_size)


def warm_batch(segmenter, batch: int) -> float:
    """One batch size warmed (its untimed calls), then timed once: seconds."""
    images = _dummy(segmenter, batch)
    for _ in range(_untimed_calls(segmenter)):
        segmenter.infer(images)
    return _time(segmenter, images)


def _in_budget(batch: int, max_batch_size: int, started: float, budget_s: float) -> bool:
    """The common sizes always; the odd ones while the budget lasts."""
    return batch in _common_sizes(max_batch_size) or time.perf_counter() - started <= budget_s


def _common_times(seconds: Dict[int, float], max_batch_size: int) -> Dict[int, float]:
    common = set(_common_sizes(max_batch_size))
    return {b: t for b, t in seconds.items() if b <= max_batch_size and b in common}


# -- the measurement, kept -------------------------------------------------------


def measurement_key(segmenter, limit: int, budget_s: float) -> Dict[str, str]:
    """Everything a batch-size measurement depends on."""
    path = segmenter.path
    if path is not None and Path(path).is_file():
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    else:  # a model without a file (tests): its name and version stand for it
        digest = hashlib.sha256(f"{segmenter.name}:{segmenter.version}".encode()).hexdigest()
    return {
        "device": device_description(segmenter.device),
        "model_sha256": digest,
        "precision": segmenter.precision,
        "torch": torch.__version__,
        "chanseg": model.__version__,
        "allocator": allocator(),
        "limit": str(limit),
        "budget_s": f"{budget_s:g}",
        "method": METHOD,
    }


class MeasurementCache:
    """``batch-size-<hash of the key>.json`` in the cache directory (``CHANSEG_CACHE_DIR``),
    or, when that is read-only (the Docker image's), in this user's private temporary one
    (``model.pretrained.fallback_cache_dir``). A measurement read back is checked: a size
    outside 1..the key's limit, or throughputs that are not positive numbers, are ignored."""

    def __init__(self, key: Dict[str, str], directory: Optional[Path] = None) -> None:
        self.key = key
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.filename = f"batch-size-{name}.json"
        self.places = cache_places(directory)

    def load(self) -> Optional[BatchChoice]:
        for place in self.places:
            path = place / self.filename
            try:
                doc = json.loads(path.read_text())
                if doc.get("key") != self.key:
                    continue
                return _checked(
                    BatchChoice(
                        max_batch_size=int(doc["max_batch_size"]),
                        source="reused",
                        throughput={int(b): float(v) for b, v in doc["throughput"].items()},
                        measured_at=str(doc["measured_at"]),
                    ),
                    int(self.key["limit"]),
                )
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("ignoring unreadable batch-size measurement %s: %s", path, exc)
        return None

    def save(self, choice: BatchChoice) -> Optional[Path]:
        doc = {"key": self.key, **asdict(choice)}
        doc.pop("source")
        for place in self.places:
            try:
                with written_atomically(place / self.filename, ".json") as tmp:
                    Path(tmp).write_text(json.dumps(doc, indent=2))
                return place / self.filename
            except OSError:
                continue
        log.warning("could not keep the batch-size measurement: no writable cache directory")
        return None


def _checked(choice: BatchChoice, limit: int) -> BatchChoice:
    if not 1 <= choice.max_batch_size <= limit:
        raise ValueError(f"batch size {choice.max_batch_size} is not within 1..{limit}")
    if not all(1 <= b <= limit and math.isfinite(v) and v > 0 for b, v in choice.throughput.items()):
        raise ValueError("its throughputs are not positive numbers for batch sizes within the limit")
    return choice


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
