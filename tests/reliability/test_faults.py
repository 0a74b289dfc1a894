"""Faults: clients that vanish, a batch that raises, a bad image among good ones."""

from __future__ import annotations

import asyncio
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

import model
from testbed.images import make_images
from tests.reliability.conftest import report
from tests.service.conftest import SlowSegmenter, make_settings, serve, until

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def _raw_request(url: str, body: bytes, declared: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /predict?format=png HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {declared if declared is not None else len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def _settle(server, fds_before: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.open_fds() > fds_before:
        time.sleep(0.1)
    return server.open_fds()


def test_disconnect_mid_upload_costs_nothing(server):
    body = make_images(1, 256)[0]
    assert (
        httpx.post(server.url + "/predict", content=body, headers={"content-type": "image/png"}).status_code
        == 200
    )
    fds, computed = server.open_fds(), server.metric("chanseg_batch_size_sum")
    for _ in range(20):  # declare 200 kB, send 1 kB, hang up
        _raw_request(server.url, body[:1000], declared=200_000).close()
    fds_after = _settle(server, fds)
    r = httpx.post(server.url + "/predict", content=body, headers={"content-type": "image/png"}, timeout=30)
    report(
        "disconnect mid-upload",
        fds=(fds, fds_after),
        computed=server.metric("chanseg_batch_size_sum") - computed,
    )
    assert r.status_code == 200
    assert fds_after <= fds
    assert server.metric("chanseg_batch_size_sum") - computed == 1  # only the good request


def test_disconnect_while_queued_is_not_computed(server):
    """32 images (two requests of 16) keep the model busy; 10 clients queue behind
    them and hang up: their images are dropped before compute, and the server frees
    their sockets. The test hangs up as soon as /metrics shows the 10 prepared, not
    after a fixed sleep, which a fast machine outran (it computed 4 of the 10)."""
    images = make_images(16, 256)
    busy_files = [("file", (f"{i}.png", im)) for i, im in enumerate(images)]
    fds, computed = server.open_fds(), server.metric("chanseg_batch_size_sum")
    gone = server.metric("chanseg_requests_total", status="499")
    prepared = server.metric("chanseg_preprocess_duration_seconds_count")

    def prepared_since() -> float:
        return server.metric("chanseg_preprocess_duration_seconds_count") - prepared

    with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(client.post, "/predict", files=busy_files) for _ in range(2)]
        until(lambda: prepared_since() >= 32, "the 32 busy images were never prepared", every=0.005)
        socks = [_raw_request(server.url, images[i]) for i in range(10)]
        until(lambda: prepared_since() >= 42, "the 10 were never prepared", every=0.005)
        depth = server.metric("chanseg_queue_depth")  # queued or computing: the 10 and what is left of the 32
        for s in socks:
            s.close()
        assert [b.result().status_code for b in busy] == [200, 200]
    time.sleep(0.5)
    fds_after = _settle(server, fds)
    done = server.metric("chanseg_batch_size_sum") - computed
    dropped = server.metric("chanseg_requests_total", status="499") - gone
    report(
        "disconnect while queued",
        depth_at_hang_up=depth,
        computed=done,
        dropped_499=dropped,
        fds=(fds, fds_after),
    )
    assert done == 32, done
    assert dropped == 10
    assert fds_after <= fds
    log = server.log.read_text()
    assert "never retrieved" not in log and "Traceback" not in log, log[-2000:]


def test_one_bad_image_fails_only_its_request_not_its_batch_mates(server):
    segmenter = model.load(None, precision="auto")  # what the server loads (PRECISION=auto)
    good = make_images(4, 256, seed=7)
    bad_request = [("file", ("ok.png", good[0])), ("file", ("broken.png", good[1][:300]))]

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(
                c.post("/predict?format=png", content=good[2], headers={"content-type": "image/png"}),
                c.post("/predict", files=bad_request),
                c.post("/predict?format=png", content=good[3], headers={"content-type": "image/png"}),
            )

    a, bad, b = asyncio.run(go())
    assert (a.status_code, bad.status_code, b.status_code) == (200, 400, 200)
    assert "broken.png" in bad.json()["detail"]
    for r, img in ((a, good[2]), (b, good[3])):
        expected = segmenter.predict(Image.open(io.BytesIO(img)))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected)


class PoisonedSegmenter(SlowSegmenter):
    """Raises for any batch holding an all-white image (an input the model cannot take)."""

    def logits(self, prepared):
        self.batches.append([int(p.float().mean()) for p in prepared])
        if any(bool((p == 255).all()) for p in prepared):
            raise RuntimeError("simulated device fault")
        return self.inner.logits(prepared)


@pytest.mark.anyio
async def test_exception_in_one_batch_fails_only_its_image(tiny_artifact, tiny_segmenter):
    """12 concurrent requests in batches of up to 4, one poisoned: its batch is
    retried in halves down to the poisoned image, whose request alone gets 500;
    every other request gets its mask, and traffic goes on."""
    poisoned = PoisonedSegmenter(tiny_segmenter)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 200, (32, 32, 3), dtype=np.uint8) for _ in range(12)]
    images[5] = np.full((32, 32, 3), 255, np.uint8)
    pngs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    async with serve(
        make_settings(tiny_artifact, max_batch_size=4, max_batch_delay_ms=50), segmenter=poisoned
    ) as client:
        answers = await asyncio.gather(
            *(
                client.post("/predict?format=png", content=b, headers={"content-type": "image/png"})
                for b in pngs
            )
        )
        after = await client.post(
            "/predict?format=png", content=pngs[0], headers={"content-type": "image/png"}
        )
    failed = [i for i, r in enumerate(answers) if r.status_code == 500]
    assert failed == [5]
    assert [255] in poisoned.batches  # it ran alone in the end
    assert all(r.status_code in (200, 500) for r in answers)
    for i, r in enumerate(answers):
        if r.status_code == 200:
            mask = np.asarray(Image.open(io.BytesIO(r.content)))
            np.testing.assert_array_equal(mask, tiny_segmenter.predict(images[i]))
    assert after.status_code == 200
