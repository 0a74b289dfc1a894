"""Prometheus collectors, created on a registry that is passed in (one per app).

Names and labels are a contract (docs/design.md; docs/metrics.md lists them, generated from
this file by ``python -m service.docs_pages``). Labels are bounded: ``endpoint`` is
a fixed route name, ``status`` an HTTP status code.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    gc_collector,
    platform_collector,
    process_collector,
)

__all__ = ["Metrics", "LATENCY_BUCKETS"]

# 1 ms .. 30 s, roughly x1.5-2.5 apart: resolves a 5 ms queue wait and a 20 s overload.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25,
    0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 3.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
)  # fmt: skip


class Metrics:
    """All of chanseg's collectors on ``registry`` (a fresh one when None), with
    the default process, platform and GC metrics. ``max_batch_size`` is the
    largest batch the server may run: ``chanseg_batch_size`` gets a bucket for
    each size from 1 to it."""

    def __init__(self, max_batch_size: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        process_collector.ProcessCollector(registry=r)
        platform_collector.PlatformCollector(registry=r)
        gc_collector.GCCollector(registry=r)
        self.requests = Counter(
            "chanseg_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "chanseg_request_duration_seconds",
            "Time from request start to response, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("chanseg_images", "Images segmented", registry=r)
        self.queue_wait = Histogram(
            "chanseg_queue_wait_seconds",
            "Time an image waited in the batch queue",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "chanseg_inference_duration_seconds", "Model time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "chanseg_batch_size",
            "Images per batch (a bucket per size, 1 to the largest batch)",
            buckets=tuple(float(b) for b in range(1, max(1, max_batch_size) + 1)),
            registry=r,
        )
        self.queue_depth = Gauge("chanseg_queue_depth", "Images waiting in the batch queue", registry=r)
        self.preprocess = Histogram(
            "chanseg_preprocess_duration_seconds",
            "Decode, convert and resize, per image",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.postprocess = Histogram(
            "chanseg_postprocess_duration_seconds",
            "Mask resize and PNG encoding, per image",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_info = Info("chanseg_model", "The model being served", registry=r)
        self.memory_budget = Gauge(
            "chanseg_memory_budget_bytes",
            "Bytes requests in flight may hold, by ledger (body, work)",
            ["ledger"],
            registry=r,
        )
        self.memory_reserved = Gauge(
            "chanseg_memory_reserved_bytes",
            "Bytes reserved by requests in flight, by ledger",
            ["ledger"],
            registry=r,
        )
        self.memory_wait = Histogram(
            "chanseg_memory_wait_seconds",
            "Time a reservation waited for room in the memory budget, by ledger",
            ["ledger"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.connections_refused = Counter(
            "chanseg_connections_refused",
            "Connections closed by the server's guards (reason: header_timeout, header_too_large, "
            "idle, invalid_http, write_stalled)",
            ["reason"],
            registry=r,
        )
        self.batch_running = Gauge(
            "chanseg_batch_running_seconds",
            "How long the batch on the device has been running (0 when idle): the liveness watchdog's input",
            registry=r,
        )
        self.load_running = Gauge(
            "chanseg_load_running_seconds",
            "How long the model load or warm-up step on the inference thread has been running (0 when none): "
            "liveness fails past LOAD_TIMEOUT_S",
            registry=r,
        )

    def set_model(self, name: str, version: str, device: str, precision: str) -> None:
        self.model_info.info({"name": name, "version": version, "device": device, "precision": precision})
