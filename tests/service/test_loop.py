"""The event loop stays free: ``/healthz`` answers in milliseconds while the largest
legal v2 requests are parsed and their responses encoded (a real process; the
probe runs in a process of its own, so the test's own threads cannot delay it)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from service.v2_codec import MAX_JSON_VALUES
from tests.service.conftest import ServerProcess

PROBE = r"""
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
sock = socket.create_connection(("127.0.0.1", port))
latencies, end = [], time.monotonic() + seconds
while time.monotonic() < end:
    t = time.perf_counter()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b'"ok"}') and not data.endswith(b"}"):
        data += sock.recv(4096)
    latencies.append((time.perf_counter() - t) * 1000)
    time.sleep(0.01)
print(len(latencies), max(latencies), sorted(latencies)[len(latencies) // 2])
"""


def _json_image(height: int, width: int) -> bytes:
    data = np.random.default_rng(0).integers(0, 256, height * width * 3).tolist()
    return json.dumps(
        {
            "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, height, width, 3], "data": data}],
            "outputs": [{"name": "MASK"}, {"name": "PROBABILITIES"}],  # both as JSON
        }
    ).encode()


def _binary_image(height: int, width: int) -> tuple[bytes, dict]:
    pixels = np.full((1, height, width, 3), 90, np.uint8).tobytes()
    header = json.dumps(
        {
            "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, height, width, 3],
                        "parameters": {"binary_data_size": len(pixels)}}],
            "outputs": [{"name": "MASK", "parameters": {"binary_data": True}}],
        }
    ).encode()  # fmt: skip
    return header + pixels, {"inference-header-content-length": str(len(header))}


def _base64_file(nbytes: int) -> bytes:
    side = int((nbytes / 3) ** 0.5)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
        buf, format="PNG", compress_level=0
    )
    blob = base64.b64encode(buf.getvalue()).decode()
    return json.dumps({"inputs": [{"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1], "data": [blob]}]}).encode()


@pytest.mark.timeout(300)
def test_healthz_answers_fast_while_the_largest_v2_requests_run(tiny_artifact, tmp_path):
    side = int((MAX_JSON_VALUES / 3) ** 0.5)  # the most values JSON may hold
    bodies = [
        (_json_image(side, side), {}),
        _binary_image(3000, 3400),  # ~30 MB of binary tensor, under MAX_UPLOAD_BYTES
        (_base64_file(5_500_000), {}),  # ~7.3 MB of base64, under MAX_JSON_BYTES
    ]
    server = ServerProcess(tiny_artifact, tmp_path, CHANSEG_LOG_LEVEL="warning")
    try:
        server.wait_ready()
        probe = subprocess.Popen(
            [sys.executable, "-c", PROBE, str(server.port), "12"], stdout=subprocess.PIPE, text=True
        )
        statuses = []

        def send(body, headers):
            for _ in range(3):
                r = httpx.post(server.url + "/v2/models/tiny/infer", content=body, headers=headers, timeout=120)
                statuses.append(r.status_code)

        senders = [threading.Thread(target=send, args=b) for b in bodies]
        for t in senders:
            t.start()
        out, _ = probe.communicate(timeout=120)
        for t in senders:
            t.join(120)
    finally:
        server.stop()
    count, worst, median = out.split()
    print(f"\n/healthz while parsing and encoding: {count} probes, median {float(median):.1f} ms, max {float(worst):.1f} ms")
    assert statuses == [200] * 9, (statuses, server.log.read_text()[-3000:])
    assert int(count) > 100
    assert float(worst) < 100, worst
