"""A stuck inference thread, in a real process: liveness fails so an orchestrator
restarts the pod, and SIGTERM still ends the process inside its shutdown budget.

The model is a real TorchScript artifact that computes for ever on a white image,
as a hung CUDA kernel or a deadlocked library would keep the thread."""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from torch import Tensor, nn

import model
from model.export import script
from service.server import EXIT_MARGIN_S
from testbed.metrics import metric_samples
from tests.conftest import TINY, make_net
from tests.service.conftest import ServerProcess, png_bytes, random_image

pytestmark = pytest.mark.slow  # a real server, a real part or a compile: make test-all

WATCHDOG, DRAIN = 1.5, 3.0


class HangsOnWhite(nn.Module):
    """The tiny network, except that a white image makes it spin (practically) for ever."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        if bool(x.mean() > 1.5):  # normalised white is ~2.4; random images average ~0
            for _ in range(1_000_000_000):
                x = x + 0.0
        return self.inner(x)


@pytest.fixture(scope="module")
def hanging_artifact(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hang") / "hang.pt"
    model.export_torchscript(HangsOnWhite(make_net()), path, config=TINY, version="1")
    return str(path)


def test_stuck_batch_fails_liveness_and_shutdown_keeps_its_budget(hanging_artifact, tmp_path):
    server = ServerProcess(
        hanging_artifact, tmp_path,
        CHANSEG_WATCHDOG_S=str(WATCHDOG), CHANSEG_DRAIN_TIMEOUT_S=str(DRAIN), CHANSEG_MAX_BATCH_SIZE="1",
        CHANSEG_REQUEST_TIMEOUT_S="120",
    )  # fmt: skip
    try:
        server.wait_ready()
        assert httpx.get(server.url + "/healthz").status_code == 200
        white = png_bytes(np.full((32, 32, 3), 255, np.uint8))
        answers = []

        def post(body):
            try:
                r = httpx.post(
                    server.url + "/predict", content=body, headers={"content-type": "image/png"}, timeout=60
                )
                answers.append(r.status_code)
            except httpx.TransportError:
                answers.append("closed")

        senders = [
            threading.Thread(target=post, args=(body,)) for body in (white, png_bytes(random_image(1)))
        ]
        for t in senders:
            t.start()
            time.sleep(0.2)
        started = time.monotonic()
        while time.monotonic() - started < 10 and httpx.get(server.url + "/healthz").status_code == 200:
            time.sleep(0.1)
        live = httpx.get(server.url + "/healthz")
        assert live.status_code == 503 and live.json()["status"] == "stuck", live.text
        assert time.monotonic() - started < WATCHDOG + 2
        assert httpx.get(server.url + "/readyz").status_code == 503
        assert httpx.get(server.url + "/v2/health/live").status_code == 503
        metrics = httpx.get(server.url + "/metrics").text
        running = float(
            next(
                ln for ln in metrics.splitlines() if ln.startswith("chanseg_batch_running_seconds ")
            ).split()[1]
        )
        assert running > WATCHDOG

        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(30)
        took = time.monotonic() - signalled
        for t in senders:
            t.join(30)
    finally:
        server.stop()
    log = server.log.read_text()
    print(f"\nstuck batch: liveness 503 after the watchdog; SIGTERM to exit {took:.1f} s (budget {DRAIN} s)")
    assert "inference thread stuck" in log and "forward" in log  # where the thread is, once
    assert log.count("inference thread stuck") == 1
    assert took < DRAIN + EXIT_MARGIN_S, (
        took,
        log[-2000:],
    )  # the shutdown budget holds with a thread that never returns
    assert code == 1  # accepted work was abandoned: not a clean exit
    assert len(answers) == 2 and 200 not in answers


def test_a_normal_batch_never_trips_the_watchdog(tiny_artifact, tmp_path):
    server = ServerProcess(tiny_artifact, tmp_path)  # WATCHDOG_S=auto
    try:
        server.wait_ready()
        body = png_bytes(random_image(2, 64, 64))
        for _ in range(5):
            assert (
                httpx.post(
                    server.url + "/predict", content=body, headers={"content-type": "image/png"}
                ).status_code
                == 200
            )
            assert httpx.get(server.url + "/healthz").status_code == 200
    finally:
        server.stop()
    watchdog = float(re.search(r"watchdog (\d+) s", server.log.read_text()).group(1))
    assert 10 <= watchdog < 60  # auto: 20x a tiny batch (more on a busy machine), at least 10 s


def test_hanging_model_is_fine_on_other_images():
    net = script(HangsOnWhite(make_net()))
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 64, 64)


class FaultsOnWhite(nn.Module):
    """The tiny network, except that a white image raises what torch raises after an
    illegal memory access on a GPU (an error that leaves the CUDA context unusable)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        if bool(x.mean() > 1.5):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.inner(x)


def test_a_lost_device_stops_the_server_with_status_1(tmp_path):
    """In a real process: after an unrecoverable device error the request gets 500,
    liveness and readiness 503 at once, and the process exits 1 by itself (an
    orchestrator then replaces it), within its shutdown budget."""
    path = tmp_path / "faulty.pt"
    model.export_torchscript(FaultsOnWhite(make_net()), path, config=TINY, version="1")
    server = ServerProcess(
        str(path), tmp_path, CHANSEG_DRAIN_TIMEOUT_S=str(DRAIN), CHANSEG_MAX_BATCH_SIZE="1"
    )
    try:
        server.wait_ready()
        ok = httpx.post(
            server.url + "/predict", content=png_bytes(random_image(1)), headers={"content-type": "image/png"}
        )
        white = png_bytes(np.full((32, 32, 3), 255, np.uint8))
        failed = httpx.post(server.url + "/predict", content=white, headers={"content-type": "image/png"})
        started = time.monotonic()
        code = server.proc.wait(DRAIN + EXIT_MARGIN_S + 5)
        took = time.monotonic() - started
    finally:
        server.stop()
    log = server.log.read_text()
    print(f"\nlost device: process gone {took:.1f} s after the failed request, exit status {code}")
    assert ok.status_code == 200 and failed.status_code == 500
    assert "illegal memory access" not in failed.text  # the detail is in the log, not the response
    assert code == 1, log[-2000:]
    assert "device lost" in log and "illegal memory access" in log


class HangsOnAnyImage(nn.Module):
    """The tiny network, except that any image but a black one makes it spin (practically)
    for ever: its first warm-up pass never returns."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        if bool(x.std() > 0.1):  # warm-up's random images; a black image is flat
            for _ in range(1_000_000_000):
                x = x + 0.0
        return self.inner(x)


LOAD_TIMEOUT = 2.0


def test_a_load_that_never_ends_fails_liveness_and_shutdown_keeps_its_budget(tiny_artifact, tmp_path):
    """Issue 31: such a load kept the probes at 200 and every later load at 409, and the
    process outlived SIGTERM by minutes."""
    repo = tmp_path / "repo"
    repo.mkdir()
    model.export_torchscript(HangsOnAnyImage(make_net()), repo / "stuck.pt", config=TINY, version="2")
    server = ServerProcess(
        tiny_artifact, tmp_path,
        CHANSEG_MODEL_REPOSITORY=str(repo), CHANSEG_LOAD_TIMEOUT_S=str(LOAD_TIMEOUT), CHANSEG_DRAIN_TIMEOUT_S=str(DRAIN),
    )  # fmt: skip
    try:
        server.wait_ready()
        started = time.monotonic()
        r = httpx.post(
            server.url + "/v2/repository/models/tiny/load",
            json={"parameters": {"path": "stuck.pt"}},
            timeout=60,
        )
        took = time.monotonic() - started
        assert r.status_code == 504 and "LOAD_TIMEOUT_S" in r.json()["error"], r.text
        assert "warming up stuck.pt" in r.json()["error"] and took < LOAD_TIMEOUT + 2
        live = httpx.get(server.url + "/healthz")
        assert live.status_code == 503 and live.json()["status"] == "stuck", live.text
        assert httpx.get(server.url + "/readyz").status_code == 503
        metrics = httpx.get(server.url + "/metrics").text
        running = metric_samples(metrics)[("chanseg_load_running_seconds", ())]
        assert running > LOAD_TIMEOUT
        # Nothing more can run behind the stuck load: further loads and unloads are refused at once.
        for action, body in (("load", {"parameters": {"path": "stuck.pt"}}), ("unload", {})):
            r = httpx.post(f"{server.url}/v2/repository/models/tiny/{action}", json=body, timeout=10)
            assert r.status_code == 503 and "must be restarted" in r.json()["error"], (action, r.text)

        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(30)
        took = time.monotonic() - signalled
    finally:
        server.stop()
    log = server.log.read_text()
    print(
        f"\nstuck load: 504 after LOAD_TIMEOUT_S, liveness 503; SIGTERM to exit {took:.1f} s (budget {DRAIN} s)"
    )
    assert "inference thread stuck: warming up stuck.pt" in log and "forward" in log
    assert took < DRAIN + EXIT_MARGIN_S, (took, log[-2000:])
    assert code == 1


def test_a_start_up_load_that_never_ends_stops_the_process(tmp_path):
    path = tmp_path / "stuck.pt"
    model.export_torchscript(HangsOnAnyImage(make_net()), path, config=TINY, version="2")
    server = ServerProcess(str(path), tmp_path, CHANSEG_LOAD_TIMEOUT_S=str(LOAD_TIMEOUT))
    try:
        code = server.proc.wait(LOAD_TIMEOUT + 30)
    finally:
        server.stop()
    log = server.log.read_text()
    assert code == 3, log[-2000:]  # uvicorn's start-up failure
    assert "start-up did not finish within LOAD_TIMEOUT_S (2 s): warming up was still running" in log


def test_the_stuck_load_model_is_fine_on_a_black_image():
    net = script(HangsOnAnyImage(make_net()))
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 64, 64)
