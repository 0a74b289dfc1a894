"""Versions swapped under load in a real ``python -m service`` process: A -> B -> A
through the v2 repository extension, a corrupt version refused, then B again by
SIGHUP after MODEL_PATH was replaced on disk. A closed loop of requests runs all the
while: every request must answer 200 with the mask of the version that served it
(``X-Model-Version``). Prints what the swaps cost (``pytest -s``)."""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import model
from model import ModelConfig
from tests.conftest import make_net
from tests.service.conftest import ServerProcess, decode_mask, png_bytes, random_image

pytestmark = pytest.mark.slow  # a real server, a real part or a compile: make test-all

CONFIG = ModelConfig(widths=(8, 16, 32), input_size=(256, 256), name="medium")  # ~30 ms an image here
IMAGE = random_image(31, 200, 300)


def test_versions_swap_under_load_without_a_failed_request(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for version, seed in (("1", 0), ("2", 1)):
        model.export_torchscript(make_net(CONFIG, seed), repo / f"v{version}.pt", version=version)
    (repo / "corrupt.pt").write_bytes((repo / "v1.pt").read_bytes()[:5000])
    shutil.copyfile(repo / "v1.pt", repo / "current.pt")  # MODEL_PATH: replaced on disk, then SIGHUP
    expected = {v: model.load(repo / f"v{v}.pt", device="cpu").predict(IMAGE) for v in ("1", "2")}
    assert (expected["1"] != expected["2"]).mean() > 0.01

    server = ServerProcess(
        str(repo / "current.pt"), tmp_path, CHANSEG_MODEL_REPOSITORY=str(repo), CHANSEG_MAX_BATCH_DELAY_MS="5"
    )
    answers, stop, loops = [], threading.Event(), []

    def closed_loop() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            body = png_bytes(IMAGE)
            while not stop.is_set():
                started = time.monotonic()
                r = client.post("/predict?format=png", files={"file": ("x.png", body, "image/png")})
                ok = r.status_code == 200 and np.array_equal(
                    decode_mask(r.content), expected.get(r.headers.get("x-model-version"), -1)
                )
                answers.append(
                    (started, time.monotonic() - started, r.status_code, r.headers.get("x-model-version"), ok)
                )

    def load(path: str) -> httpx.Response:
        return httpx.post(
            f"{server.url}/v2/repository/models/medium/load", json={"parameters": {"path": path}}, timeout=120
        )

    try:
        server.wait_ready()
        loops += [threading.Thread(target=closed_loop) for _ in range(4)]
        for t in loops:
            t.start()
        swaps = []

        def swap(action, *args):
            time.sleep(0.5)
            began = time.monotonic()
            result = action(*args)
            swaps.append((began, time.monotonic()))
            return result

        assert swap(load, "v2.pt").status_code == 200
        refused = swap(load, "corrupt.pt")
        assert refused.status_code == 400 and "medium 2 keeps serving" in refused.json()["error"]
        assert swap(load, "v1.pt").status_code == 200

        os.replace(repo / "v2.pt", repo / "current.pt")  # a new file at MODEL_PATH, then SIGHUP
        began = time.monotonic()
        server.proc.send_signal(signal.SIGHUP)
        while httpx.get(server.url + "/v1/model").json()["version"] != "2":
            assert time.monotonic() - began < 60, "SIGHUP never swapped the new file in"
            time.sleep(0.05)
        swaps.append((began, time.monotonic()))
        time.sleep(1.0)
        stop.set()
        for t in loops:
            t.join(60)
        assert server.proc.poll() is None
    finally:
        stop.set()
        for t in loops:
            t.join(60)
        server.stop()

    failed = [a for a in answers if not a[4]]
    assert not failed, (
        f"{len(failed)} of {len(answers)} requests failed or had another version's mask: {failed[:3]}"
    )
    seen = [a[3] for a in sorted(answers)]
    changes = [v for i, v in enumerate(seen) if i == 0 or v != seen[i - 1]]
    assert changes[:1] == ["1"] and "2" in changes and changes[-1] == "2", changes

    during = [a[1] for a in answers if any(b <= a[0] + a[1] and a[0] <= e for b, e in swaps)]
    outside = [a[1] for a in answers if not any(b <= a[0] + a[1] and a[0] <= e for b, e in swaps)]
    print(
        f"\nswap under load: {len(answers)} requests, all 200 with their version's mask; "
        f"swaps took {', '.join(f'{e - b:.2f}' for b, e in swaps)} s (load, refused, load, SIGHUP); "
        f"latency outside swaps median {statistics.median(outside) * 1000:.0f} ms max {max(outside) * 1000:.0f} ms; "
        f"during swaps ({len(during)} requests) median {statistics.median(during) * 1000:.0f} ms max {max(during) * 1000:.0f} ms"
    )
    deadline = 30.0  # REQUEST_TIMEOUT_S
    assert max(a[1] for a in answers) < deadline


def test_sighup_is_ignored_when_reloading_is_off(tiny_artifact, tmp_path):
    server = ServerProcess(tiny_artifact, tmp_path)
    try:
        server.wait_ready()
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert server.proc.poll() is None and httpx.get(server.url + "/readyz").status_code == 200
        assert "SIGHUP ignored: reloading is off" in Path(server.log).read_text()
    finally:
        server.stop()
