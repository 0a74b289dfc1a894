"""Service fixtures: apps on the tiny model, driven in-process through httpx."""

from __future__ import annotations

import io
import time
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from PIL import Image

from service.app import create_app
from service.settings import Settings


@pytest.fixture
def anyio_backend():
    return "asyncio"


def png_bytes(array: np.ndarray, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **save)
    return buf.getvalue()


def random_image(seed: int, h: int = 48, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def decode_mask(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.mode == "P"
    return np.asarray(image)


def make_settings(artifact: str, **overrides: Any) -> Settings:
    values = dict(
        model_path=artifact, device="cpu", max_batch_size=8, max_batch_delay_ms=20, log_level="warning"
    )
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def serve(settings: Settings, segmenter: Any = None):
    """The app with its lifespan, and an httpx client talking to it in-process."""
    app = create_app(settings, segmenter=segmenter)
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://chanseg", timeout=60) as client:
            client.app = app
            yield client


class SlowSegmenter:
    """A real Segmenter whose batches take at least `delay` seconds (and can be made to fail)."""

    def __init__(self, inner, delay: float = 0.3) -> None:
        self.inner, self.delay = inner, delay
        self.fail_next = False
        self.batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def logits(self, prepared):
        self.batches.append(len(prepared))
        time.sleep(self.delay)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated CUDA error")
        return self.inner.logits(prepared)
