"""The reliability suite: a real ``python -m service`` on the bundled model.

Every test has a short form (CI, ``make test-all``) and a long form chosen with
``CHANSEG_RELIABILITY=long`` (``make reliability``): the durations of the
issue (60 s held load, 20 s overload, 5 min soak). Figures are printed (``-s``
shows them) so the long forms' results can be quoted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict

import httpx
import pytest

from benchmarks.client import multipart
from benchmarks.loadgen import measure, run
from testbed.allocators import ALLOCATORS, find_library
from testbed.images import make_images
from tests.service.conftest import ServerProcess

LONG = os.environ.get("CHANSEG_RELIABILITY", "short") == "long"


def duration(short: float, long: float) -> float:
    return long if LONG else short


def report(name: str, **figures) -> None:
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"\n[reliability {'long' if LONG else 'short'}] {name}: {shown}")


class Server(ServerProcess):
    """The service process, and what the suite reads of it from /proc and /metrics."""

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` (with these labels) on /metrics."""
        from testbed.metrics import metric_samples, metric_total

        return metric_total(metric_samples(httpx.get(self.url + "/metrics", timeout=10).text), name, **labels)


def start_server(tmp: Path, **env: str) -> Server:
    """The bundled model (unless ``CHANSEG_MODEL_PATH`` is given), batches of up to
    4, tcmalloc when installed (as deployed: make serve, the Docker image)."""
    tcmalloc = find_library(ALLOCATORS["tcmalloc"])
    settings = {"CHANSEG_LOG_LEVEL": "warning", **({"LD_PRELOAD": tcmalloc} if tcmalloc else {}), **env}
    server = Server(None, tmp, **settings)
    try:
        server.wait_ready(timeout=180)
    except Exception:
        server.stop()
        raise
    return server


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The bundled model, batches of up to 4, the default queue and deadline: one for the
    suite (load, faults, soak), as a deployed server serves one test after another."""
    s = start_server(tmp_path_factory.mktemp("reliability"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def payloads():
    return [multipart(img) for img in make_images(8, 256)]


@pytest.fixture(scope="module")
def capacity(server, payloads) -> float:
    """Images/s this server sustains here (closed loop, 8 clients)."""
    m = run(measure(server.url, payloads, concurrency=8, window_s=2.0, warmup_s=1.0, max_windows=4))
    report("capacity", images_per_s=m.images_per_s, p50_ms=m.p50_ms, status=m.status)
    assert m.ok > 0 and m.statuses.keys() == {"200"}
    return m.images_per_s


def hold(url, payloads, rate: float, seconds: float, windows: int = 4, **kw):
    """Open-loop Poisson load at ``rate`` for ``seconds``; every window counted."""
    return run(
        measure(
            url, payloads, rate=rate, poisson=True, window_s=seconds / windows, warmup_s=0.0,
            max_windows=windows, stable_windows=windows, stability=float("inf"), **kw,
        )
    )  # fmt: skip


def statuses_only(statuses: Dict[str, int], allowed) -> bool:
    return set(statuses) <= set(allowed)
