"""The reliability suite: a real ``python -m service`` on the bundled model.

Every test has a short form (CI, ``make test``) and a long form chosen with
``CHANSEG_RELIABILITY=long`` (``make reliability``): the durations of the
issue (60 s held load, 20 s overload, 5 min soak). Figures are printed (``-s``
shows them) so the long forms' results can be quoted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import httpx
import pytest

from benchmarks.client import make_images, multipart
from benchmarks.loadgen import measure, run
from benchmarks.model_speed import ALLOCATORS, find_library
from benchmarks.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
LONG = os.environ.get("CHANSEG_RELIABILITY", "short") == "long"


def duration(short: float, long: float) -> float:
    return long if LONG else short


def report(name: str, **figures) -> None:
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"\n[reliability {'long' if LONG else 'short'}] {name}: {shown}")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` (with these labels) on /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=10).text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def stop(self, sig: int = signal.SIGKILL) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            return self.proc.wait(60)
        return self.proc.returncode


def start_server(tmp: Path, **env: str) -> Server:
    port = str(free_port())
    url = f"http://127.0.0.1:{port}"
    log = tmp / f"server-{port}.log"
    environ = dict(os.environ, PYTHONPATH=str(ROOT), CHANSEG_HOST="127.0.0.1", CHANSEG_PORT=port)
    environ.update(CHANSEG_MAX_BATCH_SIZE="4", CHANSEG_LOG_LEVEL="warning")
    tcmalloc = find_library(ALLOCATORS["tcmalloc"])
    if tcmalloc:  # as deployed (make serve, the Docker image)
        environ["LD_PRELOAD"] = tcmalloc
    environ.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], env=environ, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    server = Server(url, proc, log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"server not ready:\n{log.read_text()}")


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The bundled model, batches of up to 4, the default queue and deadline."""
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

