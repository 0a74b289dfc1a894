"""``ServerState``: what the routes share (settings, the model, the batcher, the
budgets, metrics, the phase), and the batch callback the batcher runs on the
inference thread (``run_batch``: failure isolation, device loss)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from model.predictor import top_probability

from .batching import DynamicBatcher
from .budget import MemoryBudget
from .errors import DeviceLost, device_lost
from .interface import ServedModel
from .metrics import Metrics
from .pipeline import InferItem, Inferred
from .resources import stream_threads
from .settings import Settings
from .tracing import OFF, Tracing
from .warmup import BatchChoice

log = logging.getLogger("chanseg.state")

__all__ = ["ServerState"]


@dataclass
class ServerState:
    """What the routes share: settings, the model, the batcher, metrics, phase."""

    settings: Settings
    metrics: Metrics
    segmenter: Optional[ServedModel] = None  # the version serving new requests (service.repository swaps it)
    repository: Any = None  # service.repository.ModelRepository
    grpc: Any = None  # the gRPC server (service.grpc_server), when GRPC_PORT is set
    tracing: Tracing = OFF  # service.tracing: spans, or nothing when TRACING is off
    batcher: Optional[DynamicBatcher] = None
    pool: Optional[ThreadPoolExecutor] = None  # decoding, encoding: PIL and numpy only
    inference: Optional[ThreadPoolExecutor] = None  # the thread that loads models and runs lone batches
    body_budget: Optional[MemoryBudget] = None  # request bodies in flight
    work_budget: Optional[MemoryBudget] = None  # decoding, parsing, outputs in flight
    max_batch_size: int = 0
    batching: Optional[BatchChoice] = None  # how max_batch_size was chosen
    watchdog_s: float = float("inf")  # a batch running longer than this is stuck
    inference_thread: Optional[int] = None
    streams: int = 1  # INFERENCE_STREAMS resolved: most batches running at once
    threads: int = 0  # torch threads for a batch alone, loading and measuring (0: leave torch's)
    ready: bool = False
    draining: bool = False
    shutdown_deadline: Optional[float] = None  # time.monotonic() by which the process must be gone
    drained: bool = True  # False when shutdown left accepted work unfinished
    started_at: float = field(default_factory=time.time)
    device_error: Optional[str] = None  # set when the device failed for good (lose_device)
    # Asks the process to stop, from any thread; ``python -m service`` (DrainingServer)
    # replaces it and exits 1 once device_error is set. Elsewhere: SIGTERM.
    exit_hook: Callable[[], None] = field(default=lambda: signal.raise_signal(signal.SIGTERM))
    # The load or warm-up job on the inference thread: (what, time.monotonic() its load began).
    loading: Optional[Tuple[str, float]] = None
    _stuck_logged: bool = False

    def on_inference_thread(
        self, what: str, fn: Callable, *args, since: Optional[float] = None
    ) -> "asyncio.Future":
        """``fn(*args)`` as a job on the inference thread, with all of torch's threads, watched
        as ``what`` (a step of a load: :meth:`stuck` once the load, begun at ``since``, has
        run past ``LOAD_TIMEOUT_S``; by default the job is the load)."""
        return asyncio.get_running_loop().run_in_executor(
            self.inference, self._watched, what, since, fn, *args
        )

    def _watched(self, what: str, since: Optional[float], fn: Callable, *args):
        self.loading = (what, since if since is not None else time.monotonic())
        try:
            self.use_threads()  # the thread may last have run a batch beside another
            return fn(*args)
        finally:
            self.loading = None

    @property
    def load_running_for(self) -> float:
        """Seconds the load whose step runs on the inference thread has run; 0 when none runs."""
        loading = self.loading  # the inference thread changes it
        return time.monotonic() - loading[1] if loading is not None else 0.0

    @property
    def inference_busy(self) -> bool:
        """Whether a batch, load or warm-up runs on an inference thread now (exiting would wait for it)."""
        return self.loading is not None or (self.batcher is not None and self.batcher.busy_for > 0)

    def use_threads(self, shared: bool = False) -> None:
        """On an inference thread, before torch work: all ``threads`` for a batch alone
        (and for loading and measuring), its share for a batch beside others
        (torch's thread count is per thread)."""
        wanted = stream_threads(self.threads, self.streams) if shared else self.threads
        if wanted and torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def run_batch(self, items: List[InferItem]) -> List[Any]:
        """Batcher callback, on the inference thread: one forward pass for the batch;
        per image (labels, logits when the request wants probabilities, else None),
        or the exception that image alone failed with.

        A batch that raises is retried in halves (after freeing the cached device
        memory when it ran out of it) down to single images, so an image that
        cannot be processed fails only its own request. An unrecoverable device
        error (:func:`device_lost`) instead ends the process: see ``lose_device``."""
        if self.device_error is not None:
            raise DeviceLost(f"the device failed earlier: {self.device_error}")
        try:
            return self._forward(items)
        except Exception as exc:
            if device_lost(exc):
                self.lose_device(exc)
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
            return self.run_batch(items[:half]) + self.run_batch(items[half:])

    def _forward(self, items: List[InferItem]) -> List[Inferred]:
        """One forward pass per model version in the batch: one, except for the batch
        that straddles a swap (its requests are pinned to the version they came in on)."""
        with self.tracing.batch_span(len(items), [item.request_id for item in items]) as context:
            for item in items:
                item.batch_context = context
            return self._forward_groups(items)

    def _forward_groups(self, items: List[InferItem]) -> List[Inferred]:
        groups: Dict[int, List[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item.model), []).append(i)
        out: List[Any] = [None] * len(items)
        for index in groups.values():
            served = items[index[0]].model or self.segmenter
            for i, result in zip(index, self._forward_one(served, [items[i] for i in index])):
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

    def lose_device(self, exc: BaseException) -> None:
        """After an unrecoverable device error (on the inference thread): every batch
        from now fails at once, ``/healthz`` and ``/readyz`` answer 503, and the
        process stops with exit status 1 (``exit_hook``), so that an orchestrator
        replaces it rather than routing traffic to a broken GPU."""
        if self.device_error is not None:
            return
        self.device_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        self.ready = False
        log.critical("device lost, the server stops: %s", self.device_error, exc_info=exc)
        self.exit_hook()

    @property
    def serving(self) -> bool:
        """Readiness: loaded and warmed up, not draining, a model loaded (not unloaded
        through the repository), device and inference thread well."""
        return self.ready and not self.draining and self.segmenter is not None and self.unhealthy() is None

    def unhealthy(self) -> Optional[Tuple[str, str]]:
        """(status, detail) while liveness must fail: the device was lost, or a batch is stuck."""
        if self.device_error is not None:
            return "device_lost", f"the device failed and the server is stopping: {self.device_error}"
        stuck = self.stuck()
        return ("stuck", stuck) if stuck else None

    def stuck(self) -> Optional[str]:
        """Why the inference thread looks stuck (a batch far past its measured time, a load
        or warm-up past LOAD_TIMEOUT_S), or None."""
        busy = self.batcher.busy_for if self.batcher is not None else 0.0
        loading, load_s = self.loading, self.load_running_for
        if busy > self.watchdog_s:
            detail = f"a batch has been running for {busy:.0f} s (WATCHDOG_S: {self.watchdog_s:.0f} s)"
        elif loading is not None and load_s > self.settings.load_timeout_s:
            detail = f"{loading[0]} has been running for {load_s:.0f} s (LOAD_TIMEOUT_S: {self.settings.load_timeout_s:g} s)"
        else:
            self._stuck_logged = False
            return None
        if not self._stuck_logged:  # once per episode, with where the thread is
            self._stuck_logged = True
            thread = self.batcher.busiest_thread if self.batcher is not None and busy else None
            frame = sys._current_frames().get(thread or self.inference_thread or -1)
            where = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)"
            log.error("inference thread stuck: %s; liveness fails from now\n%s", detail, where)
        return detail

    def start_draining(self, budget_s: Optional[float] = None) -> None:
        if not self.draining:
            log.info("draining: refusing new work, finishing what was accepted")
        self.draining = True
        self.ready = False
        if budget_s is not None and self.shutdown_deadline is None:
            self.shutdown_deadline = time.monotonic() + budget_s

    def shutdown_remaining(self) -> float:
        """Seconds left of the shutdown budget (DRAIN_TIMEOUT_S from the signal)."""
        if self.shutdown_deadline is None:
            return self.settings.drain_timeout_s
        return max(0.0, self.shutdown_deadline - time.monotonic())


def _selected(logits: torch.Tensor, wanted: List[bool], fn) -> List[Optional[torch.Tensor]]:
    """``fn`` of the logits of the wanted images (one call, one copy to the host), None for the others."""
    index = [i for i, want in enumerate(wanted) if want]
    done = dict(zip(index, fn(logits[index]).cpu())) if index else {}
    return [done.get(i) for i in range(len(wanted))]
