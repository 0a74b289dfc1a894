"""Service fixtures: apps on the tiny model, driven in-process through httpx."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import struct
import threading
import time
import zlib
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from PIL import Image

from service.app import create_app
from service.settings import Settings
from testbed.metrics import metric_samples
from testbed.processes import ServiceProcess, free_port


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


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk, written here rather than by the code under test."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def scanlines(pixels: np.ndarray) -> bytes:
    """An 8-bit image's PNG scanlines, unfiltered: each row after a 0 filter byte."""
    h = pixels.shape[0]
    return np.concatenate([np.zeros((h, 1), np.uint8), pixels.reshape(h, -1)], axis=1).tobytes()


def zlib_header(cinfo: int = 7) -> bytes:
    """A zlib stream's header declaring a window of 2 ** (cinfo + 8) bytes (7: 32 KiB)."""
    cmf = cinfo << 4 | 8
    return bytes([cmf, 31 - (cmf << 8) % 31])


def raw_png(
    pixels: np.ndarray, stream: bytes = b"", pieces: int = 1, between: bytes = b"", interlace: int = 0
) -> bytes:
    """An 8-bit grey or RGB PNG of ``pixels``, its zlib ``stream`` (by default the unfiltered
    scanlines') cut into ``pieces`` IDAT chunks, ``between`` after the first."""
    h, w = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    stream = stream or zlib.compress(scanlines(pixels), 6)
    cuts = [len(stream) * i // pieces for i in range(pieces + 1)]
    idats = [png_chunk(b"IDAT", stream[a:b]) for a, b in zip(cuts, cuts[1:])]
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, interlace))
        + idats[0] + between + b"".join(idats[1:]) + png_chunk(b"IEND", b"")
    )  # fmt: skip


def random_image(seed: int, h: int = 48, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def decode_mask(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.mode == "P"
    return np.asarray(image)


def tracked_by_gc(obj) -> bool:
    """Whether the cyclic collector walks ``obj`` (objects ``gc.freeze`` froze it does not)."""
    return any(o is obj for o in gc.get_objects())


def until(condition, message: str, timeout: float = 30, every: float = 0.1) -> None:
    """Poll ``condition`` every ``every`` s; fail the test with ``message`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(message)
        time.sleep(every)


def make_settings(artifact: str, **overrides: Any) -> Settings:
    values = dict(
        model_path=artifact, device="cpu", max_batch_size=8, max_batch_delay_ms=20, log_level="warning"
    )
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def serve(settings: Settings, segmenter: Any = None, **app_options: Any):
    """The app with its lifespan, and an httpx client talking to it in-process."""
    app = create_app(settings, segmenter=segmenter, **app_options)
    del segmenter  # the app alone holds it, as in a server
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://chanseg", timeout=60) as client:
            client.app = app
            yield client


class SlowSegmenter:
    """A real Segmenter whose batches take at least `delay` seconds (and can be made to fail).

    Every batch also waits for ``gate`` (open unless a test closes it); ``fail_next``
    is read when a batch starts, so a batch held at the gate has already taken it."""

    def __init__(self, inner, delay: float = 0.3) -> None:
        self.inner, self.delay = inner, delay
        self.fail_next = False
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def logits(self, prepared):
        fail, self.fail_next = self.fail_next, False  # before the batch shows in ``batches``
        self.batches.append(len(prepared))
        time.sleep(self.delay)
        self.gate.wait(30)
        if fail:
            raise RuntimeError("simulated kernel failure")
        return self.inner.logits(prepared)


@asynccontextmanager
async def held_inference(client, segmenter: SlowSegmenter, images: int):
    """Inside, the inference thread is held on one image, so the requests started
    there queue up behind it; on leaving, waits until their ``images`` images are
    queued and lets it go: they form the next batch together, however slowly each
    request was decoded. Yields the held request (a task)."""
    segmenter.gate.clear()
    held = asyncio.create_task(
        client.post("/predict", content=png_bytes(random_image(99)), headers={"content-type": "image/png"})
    )
    while not segmenter.batches:
        await asyncio.sleep(0.01)
    yield held
    for _ in range(1000):
        if metric_samples((await client.get("/metrics")).text)[("chanseg_queue_depth", ())] == 1 + images:
            break
        await asyncio.sleep(0.01)
    segmenter.gate.set()


ROOT = Path(__file__).resolve().parents[2]
SHARED_KEY = "shared-key"
SHARED_AUTH = {"authorization": f"Bearer {SHARED_KEY}"}


class ServerProcess(ServiceProcess):
    """``python -m service`` on the CPU, batches of up to 4, its log in ``tmp``;
    ``artifact=None``: the bundled model; ``grpc``: gRPC on a free port too, at
    ``grpc_url``. (The launcher is the benchmarks' own: testbed.processes.)"""

    def __init__(
        self, artifact: Optional[str], tmp: Path, port: Optional[int] = None, grpc: bool = False, **env: str
    ) -> None:
        port = port or free_port()
        settings = {"CHANSEG_DEVICE": "cpu", "CHANSEG_MAX_BATCH_SIZE": "4", "CHANSEG_LOG_LEVEL": "info"}
        if artifact is not None:
            settings["CHANSEG_MODEL_PATH"] = artifact
        if os.environ.get("LD_PRELOAD"):
            settings["LD_PRELOAD"] = os.environ["LD_PRELOAD"]
        super().__init__({**settings, **env}, log=tmp / f"server-{port}.log", port=port, grpc=grpc)


def served_masks(server: "ServerProcess", name: str) -> tuple:
    """An imported model's answers from a ready real server, for its tests to hold against
    the original's: three images of odd sizes (seeded) and their masks over
    ``/predict?format=png``, two 40x30 images stacked and the response of v2 infer asking for
    ``MASK``, and ``/v1/model``. Returns (info, images, masks, stacked, v2 response)."""
    rng = np.random.default_rng(7)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((64, 64, 3), (120, 80, 3), (33, 190, 3))
    ]
    stacked = np.stack([rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(2)])
    info = httpx.get(server.url + "/v1/model").json()
    masks = []
    for image in images:
        r = httpx.post(
            server.url + "/predict?format=png",
            content=png_bytes(image),
            headers={"content-type": "image/png"},
        )
        assert r.status_code == 200, r.text
        masks.append(np.asarray(Image.open(io.BytesIO(r.content))))
    v2 = httpx.post(
        server.url + f"/v2/models/{name}/infer",
        json={"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": list(stacked.shape), "data": stacked.ravel().tolist()}],
              "outputs": [{"name": "MASK"}]},
    )  # fmt: skip
    return info, images, masks, stacked, v2


@pytest.fixture(scope="session")
def shared_server(tiny_artifact, tmp_path_factory):
    """One real ``python -m service`` on the tiny model for the whole run, HTTP and gRPC
    (``shared_server.grpc_url``), behind ``SHARED_KEY``: the tests of real clients
    (tritonclient over HTTP and gRPC) share it rather than start one a module."""
    proc = ServerProcess(
        tiny_artifact, tmp_path_factory.mktemp("shared"), grpc=True, CHANSEG_API_KEY=SHARED_KEY
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
