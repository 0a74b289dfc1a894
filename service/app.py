"""The FastAPI app: ``create_app(settings=None, segmenter=None)`` and its lifespan.

Request lifecycle (``POST /predict`` and v2 infer):

    read body (size-limited) -> decode + convert + resize on the I/O pool
    -> DynamicBatcher queue -> one batched forward on the inference thread
    -> mask resize + PNG encode on the I/O pool -> JSON or PNG response

Start-up (lifespan): load the model on the chosen device and precision, choose
``MAX_BATCH_SIZE=auto`` by measuring, warm up each batch size, start the
batcher; only then does ``/readyz`` answer 200. All torch work (loading,
warm-up, every batch) runs on the one inference thread: each thread that runs
torch's parallel CPU kernels keeps its own OpenMP team, and more teams than
cores made every forward pass ~25% slower here. Shutdown: ``/readyz`` and new
work get 503, accepted work finishes (bounded by ``DRAIN_TIMEOUT_S``).

``uvicorn service.app:app`` works too: ``app`` is built on first access, not
at import.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch
from fastapi import FastAPI

import model

from .batching import DynamicBatcher
from .errors import register_handlers
from .logs import configure_logging
from .metrics import Metrics
from .middleware import RequestMiddleware
from .pipeline import InferItem
from .routes import health, metrics, model_info, predict, v2
from .settings import Settings
from .warmup import choose_batch_size, measure_throughput, warm_up

log = logging.getLogger("chanseg.app")

__all__ = ["create_app", "ServerState"]


@dataclass
class ServerState:
    """What the routes share: settings, the model, the batcher, metrics, phase."""

    settings: Settings
    metrics: Metrics
    segmenter: Any = None
    batcher: Optional[DynamicBatcher] = None
    pool: Optional[ThreadPoolExecutor] = None  # decoding, encoding: PIL and numpy only
    inference: Optional[ThreadPoolExecutor] = None  # the one thread that runs torch
    max_batch_size: int = 0
    batch_throughput: dict = field(default_factory=dict)
    ready: bool = False
    draining: bool = False
    started_at: float = field(default_factory=time.time)

    def infer(self, items: List[InferItem]) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Batcher callback, on the inference thread: one forward pass for the batch;
        per image its labels, and its logits when the request wants probabilities."""
        with torch.inference_mode():
            logits = self.segmenter.logits([item.tensor for item in items])
            labels = self.segmenter.labels(logits)
            return [
                (labels[i], logits[i].float().cpu() if item.want_probabilities else None)
                for i, item in enumerate(items)
            ]

    def start_draining(self) -> None:
        if not self.draining:
            log.info("draining: refusing new work, finishing what was accepted")
        self.draining = True
        self.ready = False


def _io_threads() -> int:
    return min(8, (os.cpu_count() or 2) + 2)


def create_app(settings: Optional[Settings] = None, segmenter: Any = None) -> FastAPI:
    """Build the app. ``settings`` default to the environment; ``segmenter``
    (anything with ``model.Segmenter``'s interface) replaces loading one."""
    settings = settings or Settings()
    if not logging.getLogger("chanseg").handlers:
        configure_logging(settings.log_level, settings.log_format)
    bucket_limit = (
        settings.max_batch_size if isinstance(settings.max_batch_size, int) else settings.auto_batch_limit
    )
    state = ServerState(settings=settings, metrics=Metrics(min(bucket_limit, settings.max_queue)))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await _start(state, segmenter)
        try:
            yield
        finally:
            await _stop(state)

    app = FastAPI(
        title="chanseg",
        version=model.__version__,
        summary="Image segmentation with a channel-attention U-Net",
        lifespan=lifespan,
    )
    app.state.chanseg = state
    register_handlers(app)
    for router in (health.router, predict.router, model_info.router, metrics.router, v2.router):
        app.include_router(router)
    app.add_middleware(RequestMiddleware, metrics=state.metrics, max_upload_bytes=settings.max_upload_bytes)
    return app


async def _start(state: ServerState, segmenter: Any) -> None:
    s = state.settings
    if s.num_threads:
        torch.set_num_threads(s.num_threads)
    started = time.perf_counter()
    state.inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chanseg-infer")
    loop = asyncio.get_running_loop()

    def on_inference_thread(fn, *args):
        return loop.run_in_executor(state.inference, fn, *args)

    if segmenter is None:
        segmenter = await on_inference_thread(model.load, s.model_path, s.device, s.precision)
    state.segmenter = segmenter
    log.info(
        "model %s %s loaded on %s (%s)",
        segmenter.name,
        segmenter.version,
        segmenter.device,
        segmenter.precision,
    )
    if s.max_batch_size == "auto":
        limit = min(s.auto_batch_limit, s.max_queue)
        state.batch_throughput = await on_inference_thread(measure_throughput, segmenter, limit)
        state.max_batch_size = choose_batch_size(state.batch_throughput)
        log.info(
            "MAX_BATCH_SIZE=auto chose %d from images/s %s",
            state.max_batch_size,
            {b: round(v, 1) for b, v in state.batch_throughput.items()},
        )
    else:
        state.max_batch_size = s.max_batch_size
    await on_inference_thread(warm_up, segmenter, state.max_batch_size)
    state.pool = ThreadPoolExecutor(max_workers=_io_threads(), thread_name_prefix="chanseg-io")
    state.batcher = DynamicBatcher(
        state.infer,
        state.max_batch_size,
        s.max_batch_delay_ms / 1000,
        s.max_queue,
        metrics=state.metrics,
        executor=state.inference,
    )
    await state.batcher.start()
    state.metrics.set_model(segmenter.name, segmenter.version, str(segmenter.device), segmenter.precision)
    state.ready = True
    log.info("ready in %.1f s (max batch size %d)", time.perf_counter() - started, state.max_batch_size)


async def _stop(state: ServerState) -> None:
    state.start_draining()
    if state.batcher is not None:
        drained = await state.batcher.stop(state.settings.drain_timeout_s)
        log.info("batcher stopped (%s)", "drained" if drained else "drain timeout")
    if state.pool is not None:
        state.pool.shutdown(wait=False, cancel_futures=True)
    if state.inference is not None:
        state.inference.shutdown(wait=False, cancel_futures=True)


def __getattr__(name: str):
    # `uvicorn service.app:app`: build the app when asked for, not at import.
    if name == "app":
        return create_app()
    raise AttributeError(name)
