"""The FastAPI app: ``create_app(settings=None, segmenter=None)`` and its lifespan.

Request lifecycle (``POST /predict`` and v2 infer):

    read body (size-limited, its memory reserved, within READ_TIMEOUT_S)
    -> read headers, reserve decoding memory, decode + convert + resize on the I/O pool
       (one image, while an I/O thread is idle: DECODE_AHEAD reserved first, one job for both)
    -> DynamicBatcher queue -> one batched forward on the inference thread
    -> mask resize + PNG encode on the I/O pool (one small PNG: on the loop) -> JSON or PNG response

What requests in flight may hold together is bounded by ``MEMORY_BUDGET_MB``
(:mod:`service.budget`); a batch that runs far longer than warm-up measured
fails liveness (``ServerState.stuck``), so an orchestrator restarts the pod.

Start-up (lifespan): load the model on the chosen device and precision, choose
``MAX_BATCH_SIZE=auto`` (the measurement kept in the cache for this machine and
model, or a fresh one: :mod:`service.warmup`), warm up each batch size, start
the batcher; only then does ``/readyz`` answer 200. All torch work (loading,
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
import threading
import time
from contextlib import asynccontextmanager
from typing import Optional

import torch
from fastapi import FastAPI

import model
from model.hardware import available_cpus

from .batching import DynamicBatcher, inference_pool
from .budget import MIB, MemoryBudget
from .errors import register_handlers
from .interface import ServedModel
from .iopool import IOPool
from .logs import configure_logging
from .metrics import Metrics
from .middleware import RequestMiddleware
from .repository import ModelRepository
from .resources import allocator, freeze_heap, memory_limit_bytes, rss_bytes, thaw_heap
from .responses import JSONResponse
from .routes import docs, health, metrics, model_info, page, predict, repository, v2
from .runner import BatchRunner
from .settings import Settings
from .state import ServerState
from .threads import inference_streams, stream_threads
from .tracing import start_tracing

log = logging.getLogger("chanseg.app")

__all__ = ["create_app", "io_threads"]


def io_threads(setting: int | str) -> int:
    """Decoding and encoding threads (``IO_THREADS``): the setting, or for ``auto``
    the CPUs this process may use (its affinity mask, capped by the container's CPU
    quota) plus two for the moments one waits (on memory, on the GIL between PIL
    calls), at most 64."""
    return setting if isinstance(setting, int) else min(64, available_cpus() + 2)


def create_app(
    settings: Optional[Settings] = None, segmenter: Optional[ServedModel] = None, span_exporter=None
) -> FastAPI:
    """Build the app. ``settings`` default to the environment; ``segmenter`` (any
    :class:`~service.interface.ServedModel`, e.g. a ``model.Segmenter``) replaces loading one;
    ``span_exporter`` (with ``TRACING``) replaces the one the OTEL_* variables configure."""
    settings = settings or Settings()
    if not logging.getLogger("chanseg").handlers:
        configure_logging(settings.log_level, settings.log_format)
    bucket_limit = (
        settings.max_batch_size if isinstance(settings.max_batch_size, int) else settings.auto_batch_limit
    )
    state = ServerState(settings=settings, metrics=Metrics(min(bucket_limit, settings.max_queue)))
    state.body_budget = MemoryBudget("body", settings.body_budget_bytes, state.metrics)
    state.work_budget = MemoryBudget("work", settings.work_budget_bytes, state.metrics)
    state.repository = ModelRepository(state)
    state.metrics.batch_running.set_function(lambda: state.batcher.busy_for if state.batcher else 0.0)
    state.metrics.load_running.set_function(lambda: state.load_running_for)

    given = [segmenter] if segmenter is not None else []

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The given model is handed to the state, not kept here: a later load must be
        # able to free it. An app started again serves what it served last.
        await _start(state, given.pop() if given else state.segmenter)
        try:
            yield
        finally:
            await _stop(state)

    app = FastAPI(
        title="chanseg",
        version=model.__version__,
        summary="Image segmentation with a channel-attention U-Net",
        lifespan=lifespan,
        docs_url=None,  # service.routes.docs: the same pages, their assets served from here
        redoc_url=None,
        default_response_class=JSONResponse,  # orjson (service.responses)
        # FastAPI's own OpenTelemetry (0.142 on) traces every request once any global provider
        # exists, and reads the global providers on every request to learn whether one does (~3%
        # of the event loop per /predict). Traces are TRACING's, metrics /metrics' alone.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.chanseg = state
    register_handlers(app)
    routers = (health, predict, model_info, metrics, v2, repository, page, docs)
    for router in (module.router for module in routers):
        app.include_router(router)
    app.add_middleware(predict.Direct)  # POST /predict past FastAPI's routing (routes/predict.py)
    app.add_middleware(
        RequestMiddleware,
        metrics=state.metrics,
        max_upload_bytes=settings.max_upload_bytes,
        body_budget=state.body_budget,
        read_timeout_s=settings.read_timeout_s,
        request_timeout_s=settings.request_timeout_s,
    )
    if settings.tracing:
        state.tracing = start_tracing(app, span_exporter)
    return app


async def _start(state: ServerState, segmenter: Optional[ServedModel]) -> None:
    s = state.settings
    _warn_about_an_open_repository(s)
    if s.num_threads:
        torch.set_num_threads(s.num_threads)
    started = time.perf_counter()
    state.inference = inference_pool("chanseg-infer")
    loop = asyncio.get_running_loop()
    state.inference_thread = await loop.run_in_executor(state.inference, threading.get_ident)
    segmenter = await state.repository.first_load(segmenter)  # as every later load, and its batch size chosen
    state.pool = IOPool(io_threads(s.io_threads))
    state.threads = await loop.run_in_executor(state.inference, torch.get_num_threads)  # as loading used them
    state.streams = inference_streams(s.inference_streams, segmenter.device, state.threads)
    state.batcher = DynamicBatcher(
        BatchRunner(state),
        state.max_batch_size,
        s.max_batch_delay_ms / 1000,
        s.max_queue,
        metrics=state.metrics,
        executor=state.inference,
        streams=state.streams,
        before_batch=state.use_threads,
    )
    await state.batcher.start()
    if s.grpc_port is not None:
        state.grpc = await _start_grpc(state)
    freeze_heap()  # what start-up built lives as long as the server: no full collection walks it again
    state.ready = True
    _check_memory(s)
    threads = f"{state.threads} inference threads"
    if state.streams > 1:
        threads += f", {state.streams} batches of {stream_threads(state.threads, state.streams)} side by side when busy"
    log.info(
        "ready in %.1f s (max batch size %d, %s, watchdog %.0f s, memory budget %d MiB)",
        time.perf_counter() - started,
        state.max_batch_size,
        threads,
        state.watchdog_s,
        s.memory_budget_mb,
    )


def _warn_about_an_open_repository(s: Settings) -> None:
    if s.model_repository is None or s.admin_api_key is not None:
        return
    who = "anyone who can reach this port" if s.api_key is None else "every client that holds API_KEY"
    log.warning(
        "MODEL_REPOSITORY is set without ADMIN_API_KEY: %s can load and unload models (%s). Set ADMIN_API_KEY "
        "to a key of its own, and keep the port off untrusted networks (docs/operations.md: Security)",
        who, s.model_repository,
    )  # fmt: skip


def _check_memory(s: Settings) -> None:
    """Warn when the budget on top of what the process holds now nears the container's limit."""
    log.info("allocator: %s; memory in use after warm-up: %d MiB", allocator(), rss_bytes() // MIB)
    limit, rss = memory_limit_bytes(), rss_bytes()
    if limit is not None and rss + s.memory_budget_mb * MIB > 0.9 * limit:
        log.warning(
            "MEMORY_BUDGET_MB=%d on top of %d MiB in use is over 90%% of the container's memory limit "
            "(%d MiB): lower MEMORY_BUDGET_MB or raise the limit",
            s.memory_budget_mb,
            rss // MIB,
            limit // MIB,
        )


async def _start_grpc(state: ServerState):
    try:
        from .grpc_server import start_grpc_server
    except ImportError as exc:
        raise RuntimeError(
            f"GRPC_PORT is set, but gRPC needs the grpc extra (pip install 'chanseg[grpc]'): {exc}"
        ) from None
    return await start_grpc_server(state)


async def _stop(state: ServerState) -> None:
    state.start_draining(state.settings.drain_timeout_s)
    if state.grpc is not None:  # calls in flight finish within the budget; new ones are refused
        await state.grpc.stop(grace=max(0.1, state.shutdown_remaining() / 2))
    if state.batcher is not None:
        state.drained = await state.batcher.stop(state.shutdown_remaining())
        log.info("batcher stopped (%s)", "drained" if state.drained else "shutdown budget spent")
    if state.pool is not None:
        state.pool.shutdown(wait=False, cancel_futures=True)
    if state.inference is not None:
        state.inference.shutdown(wait=False, cancel_futures=True)
    state.tracing.shutdown()  # the spans still buffered go out
    thaw_heap()  # an app built in a process that goes on (tests, a notebook) leaves nothing frozen


def __getattr__(name: str):
    # `uvicorn service.app:app`: build the app when asked for, not at import.
    if name == "app":
        return create_app()
    raise AttributeError(name)
