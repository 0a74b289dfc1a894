"""Traces: OpenTelemetry (the ``tracing`` extra), off by default and free when off.

With ``TRACING=true`` every request gets a server span (FastAPI's instrumentation,
which continues a W3C ``traceparent`` from the client; for gRPC the same from the
call's metadata) with the request id as ``chanseg.request_id``, and children for
the stages the request went through:

    read      the body arriving
    decode    one per image: header, decode, resize (on the I/O pool)
    queue     waiting in the batcher's queue
    inference the forward pass, linked to the ``batch`` span it shared with others
    encode    one per image: mask and its encodings (on the I/O pool)

A ``batch`` span (a root of its own, on the inference thread) carries the batch
size and the ids of the requests in it. The exporter is configured by the standard
variables: OTLP over HTTP (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``..._HEADERS``, ...),
or ``OTEL_TRACES_EXPORTER=console``; ``OTEL_SERVICE_NAME`` (default ``chanseg``),
``OTEL_TRACES_SAMPLER`` as the SDK reads them.

Off, :data:`OFF` stands in: its ``span`` is a shared no-op context manager and
nothing of OpenTelemetry is imported (the c=1 cost is in docs/operations.md, "Traces").
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterable, Sequence

__all__ = ["Tracing", "OFF", "start_tracing"]

_NOTHING = contextlib.nullcontext()


class Tracing:
    """What the pipeline calls; this base is the no-op used when tracing is off."""

    enabled = False

    def span(self, name: str, **attributes: Any):
        """A child of the current span for the ``with`` block."""
        return _NOTHING

    def server_span(self, name: str, carrier: dict):
        """A server span continuing the trace in ``carrier`` (gRPC metadata)."""
        return _NOTHING

    def annotate(self, request_id: str) -> None:
        """The request id on the current request's span."""

    def batch_span(self, size: int, request_ids: Sequence[str]):
        """The span of one batch on the inference thread (yields its context, or None)."""
        return _NOTHING

    def record_wait(self, enqueued: float, started: float, ended: float, batches: Iterable[Any]) -> None:
        """``queue`` and ``inference`` spans after the fact (``time.monotonic()`` times),
        the inference span linked to its batches' spans."""

    def shutdown(self) -> None:
        pass


OFF = Tracing()


class _On(Tracing):
    enabled = True

    def __init__(self, provider) -> None:
        from opentelemetry import propagate, trace

        self.provider = provider
        self.tracer = provider.get_tracer("chanseg")
        self._trace, self._propagate = trace, propagate

    def span(self, name: str, **attributes: Any):
        return self.tracer.start_as_current_span(name, attributes=attributes or None)

    def server_span(self, name: str, carrier: dict):
        context = self._propagate.extract(carrier)
        return self.tracer.start_as_current_span(name, context=context, kind=self._trace.SpanKind.SERVER)

    def annotate(self, request_id: str) -> None:
        self._trace.get_current_span().set_attribute("chanseg.request_id", request_id)

    @contextlib.contextmanager
    def batch_span(self, size: int, request_ids: Sequence[str]):
        # A root: a batch belongs to several requests' traces, each links to it.
        with self.tracer.start_as_current_span(
            "batch",
            context=self._trace.set_span_in_context(self._trace.INVALID_SPAN),
            attributes={"chanseg.batch_size": size, "chanseg.request_ids": list(request_ids)},
        ) as span:
            yield span.get_span_context()

    def record_wait(self, enqueued: float, started: float, ended: float, batches: Iterable[Any]) -> None:
        to_ns = time.time_ns() - time.monotonic_ns()  # monotonic -> epoch nanoseconds
        unique = {
            (c.trace_id, c.span_id): c for c in batches if c is not None
        }  # a request's images may share one
        links = [self._trace.Link(context) for context in unique.values()]
        for name, start, end, span_links in (
            ("queue", enqueued, started, None),
            ("inference", started, ended, links),
        ):
            span = self.tracer.start_span(name, start_time=int(start * 1e9) + to_ns, links=span_links)
            span.end(end_time=int(end * 1e9) + to_ns)

    def shutdown(self) -> None:
        self.provider.shutdown()


def start_tracing(app, exporter=None) -> Tracing:
    """Tracing for ``app``: its FastAPI instrumentation and a provider exporting to
    ``exporter`` (tests: an in-memory one), or what the OTEL_* variables say."""
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError as exc:
        raise RuntimeError(
            f"TRACING=true needs the tracing extra (pip install 'chanseg[tracing]'): {exc}"
        ) from None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "chanseg")})
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, exclude_spans=["receive", "send"])
    return _On(provider)
