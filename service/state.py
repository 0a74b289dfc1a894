"""``ServerState``: what the routes share (settings, the model serving, the batcher, the
budgets, metrics, the phase) and the server's health: the jobs on the inference thread
(``on_inference_thread``, watched for a load that never ends), a batch that never ends
(``stuck``), a lost device (``lose_device``), the drain. The forward pass the batcher
runs is :mod:`service.runner`'s; loads and swaps are :mod:`service.repository`'s."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch

from .batching import DynamicBatcher
from .budget import MemoryBudget
from .interface import ServedModel
from .iopool import IOPool
from .metrics import Metrics
from .settings import Settings
from .statistics import Statistics
from .threads import stream_threads
from .tracing import OFF, Tracing
from .warmup import BatchChoice

if TYPE_CHECKING:  # annotations only: the repository and grpc take the state
    import grpc

    from .repository import ModelRepository

log = logging.getLogger("chanseg.state")

__all__ = ["ServerState"]


@dataclass
class ServerState:
    """What the routes share: settings, the model, the batcher, metrics, phase."""

    settings: Settings
    metrics: Metrics
    segmenter: Optional[ServedModel] = None  # the version serving new requests (service.repository swaps it)
    repository: Optional[ModelRepository] = None  # every load, start-up's first (service.repository)
    grpc: Optional["grpc.aio.Server"] = None  # the gRPC server (service.grpc_server), when GRPC_PORT is set
    statistics: Statistics = field(default_factory=Statistics)  # per model version (service.statistics)
    tracing: Tracing = OFF  # service.tracing: spans, or nothing when TRACING is off
    batcher: Optional[DynamicBatcher] = None
    pool: Optional[IOPool] = None  # decoding, encoding: PIL and numpy only
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
