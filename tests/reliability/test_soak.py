"""Soak: mixed valid traffic; memory, file descriptors and threads stay flat."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
import numpy as np
import pytest

from testbed.images import make_images
from tests.reliability.conftest import duration, report

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def _requests():
    """(method, path, kwargs) of every valid kind the service takes."""
    png, jpeg = make_images(2, 256), make_images(1, 700, "JPEG")
    pixels = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    v2_json = {
        "inputs": [
            {"name": "IMAGE", "shape": [1, 40, 30, 3], "datatype": "UINT8", "data": pixels.ravel().tolist()}
        ],
        "outputs": [{"name": "MASK"}, {"name": "PROBABILITIES"}],
    }
    v2_bytes = {
        "inputs": [
            {
                "name": "IMAGE_BYTES",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(png[0]).decode()],
            }
        ]
    }
    return [
        (
            "POST",
            "/predict",
            {"files": [("file", ("a.png", png[0], "image/png")), ("file", ("b.jpg", jpeg[0], "image/jpeg"))]},
        ),
        ("POST", "/predict?format=png", {"content": png[1], "headers": {"content-type": "image/png"}}),
        ("POST", "/predict", {"content": jpeg[0], "headers": {"content-type": "image/jpeg"}}),
        ("POST", "/v2/models/chanseg/infer", {"json": v2_json}),
        ("POST", "/v2/models/chanseg/infer", {"json": v2_bytes}),
        ("GET", "/v1/model", {}),
        ("GET", "/metrics", {}),
        ("GET", "/readyz", {}),
    ]


async def _traffic(url: str, seconds: float, concurrency: int = 4) -> dict:
    kinds = _requests()
    statuses: dict = {}
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while time.monotonic() < stop:
                method, path, kw = kinds[i % len(kinds)]
                i += concurrency
                r = await c.request(method, path, **kw)
                key = f"{path.split('?')[0]} {r.status_code}"
                statuses[key] = statuses.get(key, 0) + 1

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return statuses


def test_soak_memory_fds_threads_flat(server):
    asyncio.run(_traffic(server.url, duration(6, 20), concurrency=8))  # warm-up: pools and caches filled
    rss0, fds0, threads0 = server.rss_kb(), server.open_fds(), server.threads()
    seconds = duration(30, 300)
    statuses = asyncio.run(_traffic(server.url, seconds))
    time.sleep(1.0)  # let keep-alive connections close
    rss1, fds1, threads1 = server.rss_kb(), server.open_fds(), server.threads()
    report(
        "soak", seconds=seconds, requests=sum(statuses.values()), rss_mb=(rss0 / 1024, rss1 / 1024),
        rss_growth=rss1 / rss0 - 1, fds=(fds0, fds1), threads=(threads0, threads1),
    )  # fmt: skip
    assert all(key.endswith(" 200") for key in statuses), statuses
    assert rss1 < 1.10 * rss0
    assert fds1 <= fds0
    assert threads1 <= threads0
