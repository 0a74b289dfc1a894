"""Traces (service/tracing.py) with the OpenTelemetry SDK's in-memory exporter: the
spans of one request, their parents, the trace id propagated from ``traceparent``,
and the batch span the inference links to."""

from __future__ import annotations

import pytest

from service.tracing import OFF
from tests.service.conftest import make_settings, png_bytes, random_image, serve

pytestmark = pytest.mark.anyio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def exporter():
    memory = pytest.importorskip(
        "opentelemetry.sdk.trace.export.in_memory_span_exporter",
        reason="the tracing extra (in the dev install's extras)",
    )
    return memory.InMemorySpanExporter()


async def test_one_request_is_one_trace_with_a_span_per_stage(tiny_artifact, exporter):
    files = [("file", (f"{i}.png", png_bytes(random_image(50 + i, 60, 70)), "image/png")) for i in range(2)]
    async with serve(make_settings(tiny_artifact, tracing=True), span_exporter=exporter) as client:
        r = await client.post(
            "/predict", files=files, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        )
        assert r.status_code == 200
    spans = exporter.get_finished_spans()
    server = next(s for s in spans if s.name == "POST /predict")
    assert format(server.context.trace_id, "032x") == TRACE_ID  # the client's trace goes on
    assert format(server.parent.span_id, "016x") == PARENT_ID
    assert server.attributes["chanseg.request_id"] == r.headers["x-request-id"]

    children = [s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id]
    names = sorted(s.name for s in children)
    assert names == ["decode", "decode", "encode", "encode", "inference", "queue", "read"], names
    assert all(s.context.trace_id == server.context.trace_id for s in children)
    assert sorted(s.attributes["chanseg.image"] for s in children if s.name == "decode") == ["0.png", "1.png"]

    batches = [s for s in spans if s.name == "batch"]
    assert batches and all(s.parent is None for s in batches)  # a batch is its own root
    ours = [b for b in batches if r.headers["x-request-id"] in b.attributes["chanseg.request_ids"]]
    assert ours and sum(b.attributes["chanseg.batch_size"] for b in ours) >= 2
    inference = next(s for s in children if s.name == "inference")
    assert {link.context.span_id for link in inference.links} == {b.context.span_id for b in ours}
    queue = next(s for s in children if s.name == "queue")
    assert (
        queue.start_time
        <= queue.end_time
        <= inference.start_time + 1_000_000
        <= inference.end_time + 1_000_000
    )
    assert server.start_time <= queue.start_time and inference.end_time <= server.end_time


async def test_one_image_has_one_decode_span_whichever_way_it_is_decoded(tiny_artifact, exporter):
    """A request of one image is read and decoded in one I/O job when its decoding fits
    DECODE_AHEAD, else in two (test_app): one "decode" span either way, its header read within."""
    import numpy as np

    from service.pipeline import DECODE_AHEAD

    large = np.zeros((2100, 2100, 3), np.uint8)
    large[:, 700:1400] = 200  # PIL decodes it at full size: more than DECODE_AHEAD
    async with serve(make_settings(tiny_artifact, tracing=True), span_exporter=exporter) as client:
        for image in (random_image(3, 60, 70), large):
            r = await client.post("/predict?format=png", files={"file": ("a.png", png_bytes(image))})
            assert r.status_code == 200
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.name == "POST /predict"]
    assert len(servers) == 2 and DECODE_AHEAD < 2100 * 2100 * 4
    for server in servers:
        children = [s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id]
        assert sorted(s.name for s in children) == ["decode", "encode", "inference", "queue", "read"]


async def test_v2_infer_is_traced_too(tiny_artifact, exporter):
    body = {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 16, 16, 3], "data": [0] * 768}]}
    async with serve(make_settings(tiny_artifact, tracing=True), span_exporter=exporter) as client:
        assert (await client.post("/v2/models/tiny/infer", json=body)).status_code == 200
    names = {s.name for s in exporter.get_finished_spans()}
    assert {
        "POST /v2/models/{name}/infer",
        "read",
        "decode",
        "queue",
        "inference",
        "encode",
        "batch",
    } <= names


async def test_off_by_default(tiny_artifact):
    async with serve(make_settings(tiny_artifact)) as client:
        assert client.app.state.chanseg.tracing is OFF
        assert (
            await client.post("/predict", files={"file": ("a.png", png_bytes(random_image(1)))})
        ).status_code == 200


async def test_fastapis_own_telemetry_stays_off_when_a_global_provider_is_set(
    tiny_artifact, exporter, monkeypatch
):
    """FastAPI (0.142 and later) traces every request itself once a global tracer provider
    exists (``opentelemetry-instrument``, or an SDK set up by the host process), and reads the
    global providers on every request to learn whether one does. chanseg's traces are
    ``TRACING``'s alone: with a global provider set, and ``TRACING`` off or on, no span comes
    from FastAPI."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    image = {"file": ("a.png", png_bytes(random_image(1)))}
    async with serve(make_settings(tiny_artifact)) as client:
        answers = [await client.post("/predict", files=image), await client.get("/healthz")]
    assert [r.status_code for r in answers] == [200, 200]
    assert exporter.get_finished_spans() == ()
    ours = pytest.importorskip(
        "opentelemetry.sdk.trace.export.in_memory_span_exporter"
    ).InMemorySpanExporter()
    async with serve(make_settings(tiny_artifact, tracing=True), span_exporter=ours) as client:
        assert (await client.post("/predict", files=image)).status_code == 200
    assert exporter.get_finished_spans() == ()
    assert {span.name for span in ours.get_finished_spans()} >= {"POST /predict", "read", "decode", "encode"}
