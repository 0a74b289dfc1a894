"""Service fixtures: apps on the tiny model, driven in-process through httpx."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from PIL import Image

from benchmarks.servers import free_port
from service.app import create_app
from service.settings import Settings


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def chanseg_logs(caplog):
    """caplog, fed by the chanseg loggers directly (the server's own logging set-up
    stops them propagating to the root logger, where caplog listens)."""
    logger = logging.getLogger("chanseg")
    propagate = logger.propagate
    logger.addHandler(caplog.handler)
    logger.propagate = False  # each record once
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate


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
            raise RuntimeError("simulated kernel failure")
        return self.inner.logits(prepared)


ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """``python -m service`` on a free loopback port; ``artifact=None``: the bundled model."""

    def __init__(self, artifact: Optional[str], tmp: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        environ = dict(os.environ)
        if artifact is not None:
            environ["CHANSEG_MODEL_PATH"] = artifact
        environ.update(
            CHANSEG_DEVICE="cpu",
            CHANSEG_HOST="127.0.0.1",
            CHANSEG_PORT=str(self.port),
            CHANSEG_MAX_BATCH_SIZE="4",
            CHANSEG_LOG_LEVEL="info",
            PYTHONPATH=str(ROOT),
        )
        environ.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"],
            env=environ,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
