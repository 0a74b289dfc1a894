"""Overload and deadlines: fast 503s with Retry-After, 504 past the deadline,
failed batches fail only their own requests, disconnected clients cost nothing."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from testbed.metrics import metric_samples
from tests.service.conftest import (
    SlowSegmenter,
    held_inference,
    make_settings,
    png_bytes,
    random_image,
    serve,
)
from tests.service.test_app import files

pytestmark = pytest.mark.anyio


async def test_full_queue_gets_fast_503_and_accepted_requests_succeed(tiny_artifact, tiny_segmenter):
    slow = SlowSegmenter(tiny_segmenter, delay=0.4)
    settings = make_settings(
        tiny_artifact, max_queue=2, max_images_per_request=2, max_batch_size=1, max_batch_delay_ms=0
    )
    async with serve(settings, segmenter=slow) as client:

        async def timed_post(i):
            t = time.perf_counter()
            r = await client.post("/predict", files=files(random_image(i)))
            return r, time.perf_counter() - t

        results = await asyncio.gather(*(timed_post(i) for i in range(8)))
        depth = metric_samples((await client.get("/metrics")).text)[("chanseg_queue_depth", ())]
    ok = [r for r, _ in results if r.status_code == 200]
    refused = [(r, dt) for r, dt in results if r.status_code == 503]
    assert len(ok) + len(refused) == 8
    assert 2 <= len(ok) <= 3 and refused
    for r, seconds in refused:
        assert r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
        assert seconds < 0.35  # refused at once, not after waiting for the model
    assert depth == 0


async def test_full_queue_refuses_before_decoding(tiny_artifact, tiny_segmenter):
    """Room is checked before the image is decoded: with the queue full, even an
    undecodable body gets the 503 (no CPU spent decoding what cannot be served)."""
    slow = SlowSegmenter(tiny_segmenter, delay=0.5)
    settings = make_settings(
        tiny_artifact, max_queue=1, max_images_per_request=1, max_batch_size=1, max_batch_delay_ms=0
    )
    async with serve(settings, segmenter=slow) as client:
        running = asyncio.create_task(client.post("/predict", files=files(random_image(1))))
        await asyncio.sleep(0.1)  # computing
        queued = asyncio.create_task(client.post("/predict", files=files(random_image(2))))
        await asyncio.sleep(0.1)  # waiting: the queue is full
        junk = await client.post("/predict", content=b"not an image", headers={"content-type": "image/png"})
        assert [(await running).status_code, (await queued).status_code] == [200, 200]
        after = await client.post("/predict", content=b"not an image", headers={"content-type": "image/png"})
    assert junk.status_code == 503 and junk.headers["retry-after"] == "1"
    assert after.status_code == 400  # with room again, the same body is decoded and refused


async def test_full_queue_refuses_before_reading_the_body(tiny_artifact, tiny_segmenter):
    """With the queue full, /predict and v2 answer 503 without reading a byte of the body."""
    slow = SlowSegmenter(tiny_segmenter, delay=0.5)
    settings = make_settings(
        tiny_artifact, max_queue=1, max_images_per_request=1, max_batch_size=1, max_batch_delay_ms=0
    )
    pulled = []

    async def body():
        pulled.append(True)
        yield b"x" * 1000

    async with serve(settings, segmenter=slow) as client:
        running = asyncio.create_task(client.post("/predict", files=files(random_image(1))))
        await asyncio.sleep(0.1)  # computing
        queued = asyncio.create_task(client.post("/predict", files=files(random_image(2))))
        await asyncio.sleep(0.1)  # waiting: the queue is full
        refused = [
            await client.post("/predict", content=body(), headers={"content-type": "image/png"}),
            await client.post("/v2/models/tiny/infer", content=body()),
        ]
        await running, await queued
    assert [r.status_code for r in refused] == [503, 503]
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert pulled == []


async def test_one_ms_deadline_gives_504(tiny_artifact):
    async with serve(make_settings(tiny_artifact, request_timeout_s=0.001)) as client:
        r = await client.post("/predict", files=files(random_image(1)))
        live = await client.get("/healthz")
    assert r.status_code == 504 and "deadline" in r.json()["detail"]
    assert live.status_code == 200


async def test_expired_images_are_not_computed(tiny_artifact, tiny_segmenter):
    slow = SlowSegmenter(tiny_segmenter, delay=0.3)
    settings = make_settings(tiny_artifact, max_batch_size=1, max_batch_delay_ms=0, request_timeout_s=0.15)
    async with serve(settings, segmenter=slow) as client:
        slow.batches.clear()
        results = await asyncio.gather(
            *(client.post("/predict", files=files(random_image(i))) for i in range(3))
        )
        await asyncio.sleep(0.4)  # let the computing batch end
    assert [r.status_code for r in results] == [504, 504, 504]
    assert slow.batches == [1]  # only the first started before its deadline; the others were dropped


async def test_a_batch_that_fails_once_is_retried_in_halves(tiny_artifact, tiny_segmenter, chanseg_logs):
    slow = SlowSegmenter(tiny_segmenter, delay=0.2)
    async with serve(
        make_settings(tiny_artifact, max_batch_size=2, max_batch_delay_ms=50), segmenter=slow
    ) as client:
        async with held_inference(client, slow, images=2) as held:
            slow.fail_next = True
            first = asyncio.gather(*(client.post("/predict", files=files(random_image(i))) for i in range(2)))
        held, first = await held, await first
    assert [r.status_code for r in first] == [200, 200] and held.status_code == 200
    assert slow.batches == [1, 2, 1, 1]  # the held one, the failed batch, then each half alone
    retries = [
        rec
        for rec in chanseg_logs.records
        if rec.name == "chanseg.runner" and "retrying in halves" in rec.getMessage()
    ]
    assert len(retries) == 1 and "simulated kernel failure" in retries[0].getMessage()


class Poisoned(SlowSegmenter):
    """Raises for every batch that holds an all-white image (an image the model cannot take)."""

    def logits(self, prepared):
        self.batches.append(len(prepared))
        self.gate.wait(30)
        if any(bool((p == 255).all()) for p in prepared):
            raise RuntimeError("simulated kernel failure on this input")
        return self.inner.logits(prepared)


async def test_an_image_that_always_fails_fails_only_its_request(tiny_artifact, tiny_segmenter, chanseg_logs):
    poisoned = Poisoned(tiny_segmenter, delay=0.0)
    white = np.full((40, 40, 3), 255, np.uint8)
    async with serve(
        make_settings(tiny_artifact, max_batch_size=4, max_batch_delay_ms=100), segmenter=poisoned
    ) as client:
        async with held_inference(client, poisoned, images=4) as held:
            results = asyncio.gather(
                client.post("/predict", files=files(random_image(1))),
                client.post("/predict", files=files(white)),
                client.post("/predict", files=files(random_image(2), random_image(3))),
            )
        held, results = await held, await results
        after = await client.post("/predict", files=files(random_image(4)))
    assert [r.status_code for r in results] == [
        200,
        500,
        200,
    ] and held.status_code == after.status_code == 200
    detail = results[1].json()["detail"]  # a generic message with the request id; the detail stays in the log
    assert "inference failed" in detail and results[1].headers["x-request-id"] in detail
    assert "simulated" not in detail and "conftest" not in detail
    assert poisoned.batches[:2] == [1, 4] and poisoned.batches.count(1) >= 3  # bisected down to the image
    failures = [
        rec for rec in chanseg_logs.records if rec.levelname == "ERROR" and rec.name == "chanseg.runner"
    ]
    assert len(failures) == 1  # once, for the one image, with its request's id
    assert results[1].headers["x-request-id"] in failures[0].getMessage()
    assert "simulated kernel failure" in failures[0].getMessage()


class DeviceFault(SlowSegmenter):
    """The second batch hits an unrecoverable CUDA error, as an illegal address does."""

    def logits(self, prepared):
        self.batches.append(len(prepared))
        if len(self.batches) >= 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.inner.logits(prepared)


async def test_a_lost_device_makes_the_server_unhealthy_and_stop(tiny_artifact, tiny_segmenter, chanseg_logs):
    fault = DeviceFault(tiny_segmenter, delay=0.0)
    stops = []
    async with serve(make_settings(tiny_artifact, max_batch_size=4), segmenter=fault) as client:
        state = client.app.state.chanseg
        state.exit_hook = lambda: stops.append(time.monotonic())
        ok = await client.post("/predict", files=files(random_image(1)))
        assert (await client.get("/healthz")).status_code == 200
        lost = await client.post("/predict", files=files(random_image(2), random_image(3)))
        live, ready = await client.get("/healthz"), await client.get("/readyz")
        v2_live = await client.get("/v2/health/live")
        later = await client.post("/predict", files=files(random_image(4)))
    assert ok.status_code == 200 and lost.status_code == 500
    assert fault.batches == [1, 2]  # not retried in halves: nothing more runs on a lost device
    assert live.status_code == 503 and live.json()["status"] == "device_lost"
    assert "illegal memory access" in live.json()["detail"]
    assert ready.status_code == 503 and ready.json()["status"] == "device_lost"
    assert v2_live.status_code == 503
    assert later.status_code == 503  # not ready: refused before any work
    assert len(stops) == 1  # the process was asked to stop, once
    assert any(
        rec.levelname == "CRITICAL" and "device lost" in rec.getMessage() for rec in chanseg_logs.records
    )


def test_device_errors_told_apart():
    from service.errors import device_lost

    assert device_lost(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert device_lost(RuntimeError("CUDA error: device-side assert triggered"))
    assert device_lost(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    assert not device_lost(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not device_lost(RuntimeError("Given groups=1, weight of size [8, 3, 3, 3], expected input"))
    assert not device_lost(ValueError("bad image"))


async def test_one_bad_image_fails_only_its_own_request(tiny_artifact, tiny_segmenter):
    slow = SlowSegmenter(tiny_segmenter, delay=0.1)
    async with serve(
        make_settings(tiny_artifact, max_batch_size=8, max_batch_delay_ms=100), segmenter=slow
    ) as client:
        bad_files = files(random_image(1)) + [("file", ("bad.png", b"not an image", "image/png"))]
        results = await asyncio.gather(
            client.post("/predict", files=files(random_image(2))),
            client.post("/predict", files=bad_files),
            client.post("/predict", files=files(random_image(3), random_image(4))),
        )
    assert [r.status_code for r in results] == [200, 400, 200]
    assert "bad.png" in results[1].json()["detail"]


async def test_not_ready_and_draining_refuse_work(tiny_artifact):
    async with serve(make_settings(tiny_artifact)) as client:
        state = client.app.state.chanseg
        state.start_draining()
        ready = await client.get("/readyz")
        r = await client.post("/predict", files=files(random_image(1)))
        live = await client.get("/healthz")
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert live.status_code == 200


@pytest.mark.parametrize("told_by", ["receive", "protocol"])
async def test_disconnected_client_is_not_computed(tiny_artifact, tiny_segmenter, told_by):
    """A client that goes away while its image is queued costs no inference: learnt from its
    request's messages (``http.disconnect``), or from the future service.server's protocol
    settles when the connection is lost, where nothing ever comes from ``receive``."""
    from service.middleware import CONNECTION_SCOPE_KEY

    slow = SlowSegmenter(tiny_segmenter, delay=0.4)
    async with serve(
        make_settings(tiny_artifact, max_batch_size=1, max_batch_delay_ms=0), segmenter=slow
    ) as client:
        app = client._transport.app
        slow.batches.clear()
        blocker = asyncio.create_task(client.post("/predict", files=files(random_image(1))))
        await asyncio.sleep(0.05)  # the blocker's image is computing
        body = png_bytes(random_image(2))
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent = []
        lost = asyncio.get_running_loop().create_future()

        async def receive():
            if messages:
                return messages.pop(0)
            if told_by == "protocol":
                await asyncio.Event().wait()  # never: only the connection's future tells
            await asyncio.sleep(0.05)  # then the client hangs up, while its image waits
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
            "root_path": "", "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1234), "server": ("chanseg", 80),
        }  # fmt: skip
        if told_by == "protocol":
            scope[CONNECTION_SCOPE_KEY] = {
                "first_byte": time.monotonic(),
                "over_capacity": False,
                "lost": lost,
            }
            asyncio.get_running_loop().call_later(0.05, lost.set_result, None)
        await app(scope, receive, send)
        assert (await blocker).status_code == 200
        await asyncio.sleep(0.5)
        after = await client.post("/predict", files=files(random_image(3)))
        samples = metric_samples((await client.get("/metrics")).text)
    assert sent[0]["status"] == 499  # logged as "client closed request"; nobody reads it
    assert after.status_code == 200
    assert slow.batches == [1, 1]  # the blocker and the request after: never the disconnected one
    assert samples[("chanseg_requests_total", (("endpoint", "predict"), ("status", "499")))] == 1


async def test_waiting_for_memory_past_the_deadline_is_503_as_for_bodies(tiny_artifact):
    """The budget's promise: a reservation not granted in time is 503 (not now), from either ledger."""
    async with serve(make_settings(tiny_artifact, request_timeout_s=0.5)) as client:
        budget = client.app.state.chanseg.work_budget
        hold = await budget.reserve(budget.capacity)  # all of the work ledger, held elsewhere
        try:
            r = await client.post("/predict", files=files(random_image(1)))
        finally:
            hold.release()
    assert r.status_code == 503 and "no memory free" in r.json()["detail"] and r.headers["retry-after"] == "1"
