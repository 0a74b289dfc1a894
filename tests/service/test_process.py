"""Against a real server process (python -m service, uvicorn) on a loopback port:
a real HTTP client, SIGTERM draining, and a real Prometheus scraping it."""

from __future__ import annotations

import signal
import struct
import subprocess
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import model
from model import ModelConfig
from testbed.processes import free_port
from tests.conftest import make_net
from tests.real_parts import need_tool
from tests.service.conftest import (
    ServerProcess,
    decode_mask,
    png_bytes,
    png_chunk,
    random_image,
    raw_png,
    scanlines,
    zlib_header,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def medium_artifact(tmp_path_factory) -> str:
    """Big enough (~30 ms per image here) that requests are in flight when SIGTERM comes."""
    path = tmp_path_factory.mktemp("medium") / "medium.pt"
    model.export_torchscript(
        make_net(ModelConfig(widths=(8, 16, 32), input_size=(256, 256), name="medium")), path
    )
    return str(path)


@pytest.fixture
def server(tiny_artifact, tmp_path):
    proc = ServerProcess(tiny_artifact, tmp_path)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_real_http_predict(server, tiny_segmenter):
    image = random_image(1, 70, 50)
    r = httpx.post(
        server.url + "/predict?format=png", files={"file": ("a.png", png_bytes(image), "image/png")}
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(decode_mask(r.content), tiny_segmenter.predict(image))
    assert httpx.get(server.url + "/metrics").status_code == 200


@pytest.mark.slow
def test_sigterm_drains_then_exits_zero(medium_artifact, tmp_path):
    server = ServerProcess(medium_artifact, tmp_path, CHANSEG_MAX_BATCH_DELAY_MS="5")
    try:
        server.wait_ready()
        body = png_bytes(random_image(2, 256, 256))
        with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(20) as pool:

            def post(i):
                return client.post("/predict", files={"file": (f"{i}.png", body, "image/png")})

            futures = [pool.submit(post, i) for i in range(20)]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # SIGTERM once all 20 are in the server and work is queued
                lines = client.get("/metrics").text.splitlines()
                decoded = [ln for ln in lines if ln.startswith("chanseg_preprocess_duration_seconds_count")]
                depth = [ln for ln in lines if ln.startswith("chanseg_queue_depth")]
                if float(decoded[0].split()[-1]) >= 20 and float(depth[0].split()[-1]) >= 1:
                    break
                time.sleep(0.005)
            assert time.monotonic() < deadline, "the 20 requests never queued together"
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            try:
                after = client.post("/predict", files={"file": ("late.png", body, "image/png")})
                refused = after.status_code == 503
                ready = client.get("/readyz").status_code
            except httpx.TransportError:
                refused, ready = True, None  # already closed: refused too
            statuses = [f.result().status_code for f in futures]
        code = server.proc.wait(60)
    finally:
        server.stop()
    log = server.log.read_text()
    assert statuses == [200] * 20, log
    assert refused, log
    assert ready in (503, None)
    assert code == 0, log
    assert "draining" in log


@pytest.mark.slow
@pytest.mark.real_part("prometheus, promtool")
def test_prometheus_scrapes_and_computes_p99(server, tmp_path):
    prometheus = need_tool("prometheus", "apt-get install prometheus")
    promtool = need_tool("promtool", "apt-get install prometheus")
    exposition = httpx.get(server.url + "/metrics").text
    lint = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: chanseg\n    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n"
    )
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    query = 'histogram_quantile(0.99, sum by (le) (rate(chanseg_request_duration_seconds_bucket{endpoint="predict"}[30s])))'
    try:
        body = png_bytes(random_image(3))
        p99 = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p99 is None:
            for _ in range(5):
                httpx.post(server.url + "/predict", files={"file": ("x.png", body, "image/png")})
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5)
                result = r.json()["data"]["result"]
                if result and result[0]["value"][1] not in ("NaN", "+Inf"):
                    p99 = float(result[0]["value"][1])
            except (httpx.TransportError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        up = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "up"}).json()
    finally:
        prom.terminate()
        prom.wait(10)
    assert up["data"]["result"][0]["value"][1] == "1"
    assert p99 is not None and 0 < p99 < 30


def _itxt_png(chunks: int) -> bytes:
    """A 64x64 RGB PNG with ``chunks`` iTXt chunks before its pixels, each 1 MiB of text
    deflated to ~1 KiB, with a language tag PIL cannot read (PIL inflates such a chunk and
    drops it uncounted; libspng would inflate and keep every one)."""
    itxt = b"note\x00\x01\x00\xff\x00\x00" + zlib.compress(b"\xff" * (1 << 20))
    chunk = png_chunk(b"iTXt", itxt)
    data = png_bytes(
        random_image(5, 64, 64)
    )  # the tiny model's input size: libspng's to take but for its chunks
    return data[:33] + chunk * chunks + data[33:]


@pytest.mark.slow
def test_predict_surface_against_a_real_server(tiny_artifact, tmp_path):
    """/predict as an attacker and a careless client send it, over real HTTP: no key on either
    way in (the direct path and the route), malformed and odd multipart bodies, and PNGs built
    to make a decoder hold memory their header does not declare. Each gets its 4xx or its
    answer, the process's peak memory stays small, and the server goes on serving."""
    proc = ServerProcess(tiny_artifact, tmp_path, CHANSEG_API_KEY="k3y")
    key = {"x-api-key": "k3y"}
    image = png_bytes(random_image(6, 40, 30))
    try:
        proc.wait_ready()
        for query in ("?format=png", "?format=gif", "?format=png&format=png"):
            r = httpx.post(
                proc.url + "/predict" + query, content=image, headers={"content-type": "image/png"}
            )
            assert r.status_code == 401 and r.json()["detail"], (query, r.text)
        garbage = httpx.post(
            proc.url + "/predict", content=b"no parts here", headers={"content-type": "multipart/form-data; boundary=x", **key}
        )  # fmt: skip
        assert garbage.status_code == 400 and "malformed multipart body" in garbage.json()["detail"]
        body = (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="caf\xe9.png"\r\n\r\n'
            + image
            + b"\r\n--b--\r\n"
        )
        odd = httpx.post(
            proc.url + "/predict", content=body, headers={"content-type": "multipart/form-data; boundary=b; charset=base64", **key}
        )  # fmt: skip
        assert odd.status_code == 200 and odd.json()["predictions"][0]["filename"] == "caf\u00e9.png", (
            odd.text
        )
        status = Path(f"/proc/{proc.proc.pid}/status")
        Path(f"/proc/{proc.proc.pid}/clear_refs").write_text("5")  # the peak starts again from here
        before = int(status.read_text().split("VmHWM:")[1].split()[0])
        crafted = _itxt_png(100)  # ~100 KiB, 100 MiB of text inflated
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(
                lambda _: httpx.post(proc.url + "/predict?format=png", content=crafted,
                                     headers={"content-type": "image/png", **key}, timeout=120),
                range(16),
            ))  # fmt: skip
        grown_mib = (int(status.read_text().split("VmHWM:")[1].split()[0]) - before) / 1024
        assert [r.status_code for r in answers] == [200] * 16
        print(f"\npeak RSS grew {grown_mib:.0f} MiB")
        assert grown_mib < 96, f"peak RSS grew {grown_mib:.0f} MiB"
        # PNGs at the model's size, whose pixel data ISA-L inflates: padded with 5 MB of empty
        # deflate blocks, inflating 50 MiB past the image, a window zlib refuses.
        plain = random_image(7, 64, 64)
        rows = scanlines(plain)
        for why, data, status in (
            ("padded", raw_png(plain, stream=zlib_header(7) + b"\x00\x00\x00\xff\xff" * 1_000_000
                                + b"\x01" + struct.pack("<HH", len(rows), len(rows) ^ 0xFFFF) + rows
                                + struct.pack(">I", zlib.adler32(rows))), 200),
            ("a bomb", raw_png(plain, stream=zlib.compress(rows + bytes(50 << 20), 9)), 200),
            ("a 64 KiB window", raw_png(plain, stream=zlib_header(8) + zlib.compress(rows)[2:]), 400),
        ):  # fmt: skip
            r = httpx.post(proc.url + "/predict?format=png", content=data,
                           headers={"content-type": "image/png", **key}, timeout=60)  # fmt: skip
            assert r.status_code == status, (why, r.text)
            if status == 200:
                expected = httpx.post(proc.url + "/predict?format=png", content=png_bytes(plain),
                                      headers={"content-type": "image/png", **key})  # fmt: skip
                assert np.array_equal(decode_mask(r.content), decode_mask(expected.content)), why
            else:
                assert "corrupt or truncated image data" in r.json()["detail"], why
        assert httpx.get(proc.url + "/healthz").status_code == 200
    finally:
        proc.stop()
