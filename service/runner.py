"""The forward pass the batcher runs, on the inference thread: :class:`BatchRunner`.

One forward pass per batch (per model version in it: each request is pinned to the
version that served when it came in), the labels, and for the requests that asked for
them the logits and the confidence map, copied to the host once. A batch that fails is
retried in halves, so an image that cannot be processed fails only its own request; an
error that leaves the device unusable ends the server (``ServerState.lose_device``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

import torch

from model.predictor import top_probability

from .errors import DeviceLost, device_lost
from .interface import ServedModel
from .pipeline import InferItem, Inferred

log = logging.getLogger("chanseg.runner")

__all__ = ["BatchRunner"]


class BatchRunner:
    """``runner(items)``: the batcher's ``infer`` for the server ``state`` (its model, tracing, health)."""

    def __init__(self, state) -> None:
        self.state = state

    def __call__(self, items: List[InferItem]) -> List[Any]:
        """The batcher's ``infer``, on the inference thread: one forward pass for the batch;
        per image (labels, logits when the request wants probabilities, else None),
        or the exception that image alone failed with.

        A batch that raises is retried in halves (after freeing the cached device
        memory when it ran out of it) down to single images, so an image that
        cannot be processed fails only its own request. An unrecoverable device
        error (:func:`device_lost`) instead ends the process: ``ServerState.lose_device``."""
        if self.state.device_error is not None:
            raise DeviceLost(f"the device failed earlier: {self.state.device_error}")
        try:
            return self._forward(items)
        except Exception as exc:
            if device_lost(exc):
                self.state.lose_device(exc)
                raise
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            if len(items) == 1:
                log.error(
                    "image failed (request %s): %s: %s",
                    items[0].request_id or "?",
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                    extra={"request_ids": [items[0].request_id]},
                )
                return [exc]
            log.warning(
                "batch of %d failed (%s: %s); retrying in halves", len(items), type(exc).__name__, exc
            )
            half = len(items) // 2
            return self(items[:half]) + self(items[half:])

    def _forward(self, items: List[InferItem]) -> List[Inferred]:
        """One forward pass per model version in the batch: one, except for the batch
        that straddles a swap (its requests are pinned to the version they came in on)."""
        with self.state.tracing.batch_span(len(items), [item.request_id for item in items]) as context:
            for item in items:
                item.batch_context = context
            return self._forward_groups(items)

    def _forward_groups(self, items: List[InferItem]) -> List[Inferred]:
        groups: Dict[int, List[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item.model), []).append(i)
        out: List[Any] = [None] * len(items)
        for index in groups.values():
            served = items[index[0]].model or self.state.segmenter
            started = time.perf_counter()
            results = self._forward_one(served, [items[i] for i in index])
            self.state.statistics.of(served.name, served.version).executed(
                len(index), time.perf_counter() - started
            )
            for i, result in zip(index, results):
                out[i] = result
        return out

    @staticmethod
    def _forward_one(served: ServedModel, items: List[InferItem]) -> List[Inferred]:
        with torch.inference_mode():
            logits = served.logits([item.tensor for item in items])
            labels = served.labels(logits)
            raw = _selected(logits, [item.want_probabilities for item in items], lambda x: x.float())
            confidence = _selected(logits, [item.want_confidence for item in items], top_probability)
            return [Inferred(labels[i], raw[i], confidence[i]) for i in range(len(items))]


def _selected(logits: torch.Tensor, wanted: List[bool], fn) -> List[Optional[torch.Tensor]]:
    """``fn`` of the logits of the wanted images (one call, one copy to the host), None for the others."""
    index = [i for i, want in enumerate(wanted) if want]
    done = dict(zip(index, fn(logits[index]).cpu())) if index else {}
    return [done.get(i) for i in range(len(wanted))]
