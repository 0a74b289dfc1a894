"""Build the image with a real Docker engine, run it, use it, stop it.

deploy/docker/local-engine.sh starts dockerd (Debian's docker.io) and makes a
local debian:bookworm-slim base image where no registry can be reached. When
no engine can start on a machine, the test is skipped with the reason (a failure
under CI: tests/real_parts.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from testbed.processes import free_port
from tests.real_parts import missing

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "docker" / "local-engine.sh"
TAG = "chanseg:test"
pytestmark = [pytest.mark.docker, pytest.mark.slow]


def sh(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=os.environ)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def engine():
    os.environ["DOCKER_HOST"] = sh(str(SCRIPT), "env").stdout.split("=", 1)[1].strip()
    already_running = shutil.which("docker") is not None and (
        subprocess.run(["docker", "version"], capture_output=True).returncode == 0
    )
    started = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        missing(
            f"a Docker engine (deploy/docker/local-engine.sh start failed: {started.stderr.strip()[-500:]})",
            "apt-get install docker.io debootstrap, as root; .ci/run does",
        )
    t = time.perf_counter()
    # COMPILE=none: the packages for the build machine's CPU take minutes to compile;
    # `python -m model compile` itself is tested in tests/model/test_compiled.py.
    sh(str(SCRIPT), "build", TAG, "--build-arg", "COMPILE=none", timeout=1800)
    build_s = time.perf_counter() - t
    size = int(sh("docker", "image", "inspect", TAG, "--format", "{{.Size}}").stdout)
    print(f"\nimage {TAG}: {size / 1e6:.0f} MB, built in {build_s:.0f} s")
    yield {"build_s": build_s, "size": size}
    sh("docker", "image", "rm", "-f", TAG, check=False)
    if not already_running:
        sh(str(SCRIPT), "stop", check=False)


@pytest.fixture
def container(engine):
    port, grpc_port = free_port(), free_port()
    t = time.perf_counter()
    cid = sh(
        "docker", "run", "-d", "-p", f"127.0.0.1:{port}:8000", "-p", f"127.0.0.1:{grpc_port}:8001", TAG
    ).stdout.strip()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError(
                "container not ready:\n" + sh("docker", "logs", cid, check=False).stderr[-3000:]
            )
        print(f"container start to ready: {time.perf_counter() - t:.1f} s")
        yield cid, url, f"127.0.0.1:{grpc_port}"
    finally:
        sh("docker", "rm", "-f", cid, check=False)


def shapes_png() -> tuple[bytes, np.ndarray]:
    image = Image.new("RGB", (200, 160), (230, 230, 230))
    truth = Image.new("L", (200, 160), 0)
    for draw, fill in ((ImageDraw.Draw(image), (200, 20, 20)), (ImageDraw.Draw(truth), 1)):
        draw.ellipse([40, 30, 120, 110], fill=fill)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), np.asarray(truth)


@pytest.mark.real_part("docker engine")
def test_image_serves_measures_and_stops_cleanly(container):
    cid, url, grpc_target = container
    body, truth = shapes_png()
    r = httpx.post(
        url + "/predict?format=png", content=body, headers={"content-type": "image/png"}, timeout=60
    )
    assert r.status_code == 200
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    assert (
        mask.shape == truth.shape
        and (mask[truth == 1] == 1).mean() > 0.9
        and (mask[truth == 0] == 0).mean() > 0.9
    )
    assert "chanseg_requests_total" in httpx.get(url + "/metrics").text
    page = httpx.get(url + "/")  # the page is package data: the installed image has it
    assert page.status_code == 200 and 'id="files"' in page.text
    import tritonclient.grpc as grpcclient  # the image serves gRPC on 8001 (the grpc extra is in it)

    client = grpcclient.InferenceServerClient(grpc_target)
    pixels = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))[None]
    inp = grpcclient.InferInput("IMAGE", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    np.testing.assert_array_equal(client.infer("chanseg", [inp]).as_numpy("MASK")[0], mask)

    user = sh("docker", "exec", cid, "id", "-u").stdout.strip()
    assert user == "10001"
    # The image's own HEALTHCHECK (every 10 s) reaches "healthy".
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        health = json.loads(sh("docker", "inspect", cid, "--format", "{{json .State.Health}}").stdout)
        if health["Status"] == "healthy":
            break
        time.sleep(1)
    assert health["Status"] == "healthy", health

    # In-flight requests are answered when `docker stop` sends SIGTERM: stop only once
    # all 8 are inside the server (decoded) with work still queued, as /metrics says.
    def counter(text: str, name: str) -> float:
        return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " "))

    decoded_before = counter(httpx.get(url + "/metrics").text, "chanseg_preprocess_duration_seconds_count")
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(
                httpx.post, url + "/predict", content=body, headers={"content-type": "image/png"}, timeout=60
            )
            for _ in range(8)
        ]
        deadline, in_flight = time.monotonic() + 20, False
        while time.monotonic() < deadline and not in_flight:
            text = httpx.get(url + "/metrics").text
            decoded = counter(text, "chanseg_preprocess_duration_seconds_count") - decoded_before
            in_flight = decoded >= 8 and counter(text, "chanseg_queue_depth") >= 1
            time.sleep(0.005)
        assert in_flight, "the 8 requests were never in the server together"
        t = time.perf_counter()
        sh("docker", "stop", cid)
        stop_s = time.perf_counter() - t
        statuses = [f.result().status_code for f in futures]
    state = json.loads(sh("docker", "inspect", cid, "--format", "{{json .State}}").stdout)
    logs = sh("docker", "logs", cid, check=False).stderr
    print(f"docker stop with 8 requests in flight: {stop_s:.1f} s")
    assert statuses == [200] * 8, logs[-3000:]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], logs[-3000:]
    assert stop_s < 10, f"docker stop took {stop_s:.1f} s (grace period 10 s)"
    assert "draining" in logs
