"""Triton's statistics extension: per model version, what its requests and batches cost,
cumulative since the version was loaded (``GET /v2/models/{name}/stats``, gRPC
``ModelStatistics``; what ``perf_analyzer`` reads to split a request's latency).

The figures are the batcher's own: a request's queue time is its images' longest
wait in the batch queue, its compute time the forward pass of the batch that held
it; input is the time from the request's start to its images being queued (reading,
parsing, decoding, resizing), output from their result to the end of the request
(upsampling, encoding, sending). A request counts once it reached the batch queue
(``success`` or ``fail``); one refused before (a bad image, a full queue) is only in
``chanseg_requests``. ``inference_count`` is images, ``execution_count`` forward
passes, as Triton counts them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

__all__ = ["Statistics", "VersionStatistics"]

MAX_VERSIONS = 16  # versions kept (each load adds one): the least recently used is dropped


class _Duration:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, int(seconds * 1e9))

    def as_dict(self) -> dict:
        return {"count": self.count, "ns": self.ns}


class VersionStatistics:
    """One model version's figures; updated from the event loop and the inference threads."""

    _KINDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")

    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version
        self._lock = threading.Lock()
        self._kinds = {kind: _Duration() for kind in self._KINDS}
        self._batches: Dict[int, _Duration] = {}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0

    def executed(self, batch_size: int, seconds: float) -> None:
        """One forward pass of ``batch_size`` images (on the inference thread)."""
        with self._lock:
            self.execution_count += 1
            self.inference_count += batch_size
            self.last_inference_ms = int(time.time() * 1000)
            self._batches.setdefault(batch_size, _Duration()).add(seconds)

    def request(self, ok: bool, total_s: float, queue_s: float, infer_s: float, output_s: float) -> None:
        """One request that reached the batch queue, at its end."""
        with self._lock:
            self._kinds["success" if ok else "fail"].add(total_s)
            if ok:
                self._kinds["queue"].add(queue_s)
                self._kinds["compute_infer"].add(infer_s)
                self._kinds["compute_output"].add(output_s)
                self._kinds["compute_input"].add(max(0.0, total_s - queue_s - infer_s - output_s))

    def as_dict(self) -> dict:
        """Triton's ``ModelStatistics`` JSON (int64 counts as numbers)."""
        with self._lock:
            zero = {"count": 0, "ns": 0}
            return {
                "name": self.name,
                "version": self.version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    **{kind: d.as_dict() for kind, d in self._kinds.items()},
                    "cache_hit": dict(zero),
                    "cache_miss": dict(zero),
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": dict(zero),
                        "compute_infer": d.as_dict(),
                        "compute_output": dict(zero),
                    }
                    for size, d in sorted(self._batches.items())
                ],
                "memory_usage": [],
            }


class Statistics:
    """Every version's figures since it was loaded, by (name, version)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: "OrderedDict[Tuple[str, str], VersionStatistics]" = OrderedDict()

    def of(self, name: str, version: str) -> VersionStatistics:
        """The figures of ``version``, created at its first use (its load: ``ModelRepository._swap``);
        each use keeps it from being dropped, so the serving version is not."""
        key = (name, version)
        with self._lock:
            found = self._versions.get(key)
            if found is None:
                found = self._versions[key] = VersionStatistics(name, version)
                while len(self._versions) > MAX_VERSIONS:
                    self._versions.popitem(last=False)
            else:
                self._versions.move_to_end(key)
            return found

    def report(self, name: Optional[str] = None, version: Optional[str] = None) -> List[dict]:
        with self._lock:
            kept = list(self._versions.values())
        return [
            v.as_dict()
            for v in kept
            if (name is None or v.name == name) and (version is None or v.version == version)
        ]
