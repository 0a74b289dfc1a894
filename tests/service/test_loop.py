"""The event loop stays free: ``/healthz`` answers in milliseconds, and the loop
itself spends no more than a few milliseconds on anything else, while the largest
legal v2 requests are parsed and their responses encoded (a real process; the
probe runs in a process of its own, so the test's own threads cannot delay it)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import ServerProcess

# One keep-alive connection; for each /healthz: its wall time and the CPU time the
# server's event loop (its main thread) spent meanwhile, from /proc's schedstat.
PROBE = r"""
import json, socket, sys, time
port, pid, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
schedstat = f"/proc/{pid}/task/{pid}/schedstat"  # the server's main thread, its event loop

def loop_cpu_ms():
    with open(schedstat) as f:
        return int(f.read().split()[0]) / 1e6  # time on a CPU, in ns

sock = socket.create_connection(("127.0.0.1", port))
probes, end = [], time.monotonic() + seconds
while time.monotonic() < end:
    cpu, t = loop_cpu_ms(), time.perf_counter()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"}"):
        data += sock.recv(4096)
    probes.append(((time.perf_counter() - t) * 1000, loop_cpu_ms() - cpu))
    time.sleep(0.01)
print(json.dumps(probes))
"""


def _json_image(height: int, width: int, outputs=("MASK", "PROBABILITIES"), nested: bool = False) -> bytes:
    data = np.random.default_rng(0).integers(0, 256, (height, width, 3))
    return json.dumps(
        {
            "inputs": [
                {"name": "IMAGE", "datatype": "UINT8", "shape": [1, height, width, 3],
                 "data": [data.tolist()] if nested else data.ravel().tolist()}
            ],
            "outputs": [{"name": name} for name in outputs],  # as JSON
        }
    ).encode()  # fmt: skip


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
    return json.dumps(
        {"inputs": [{"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1], "data": [blob]}]}
    ).encode()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_healthz_answers_fast_while_the_largest_v2_requests_run(tiny_artifact, tmp_path):
    bodies = [
        (_json_image(209, 209), {}),  # its outputs as JSON too: 4 x 209 x 209 probabilities
        (_json_image(1024, 1024, ["MASK"], nested=True), {}),  # issue 34: a KServe user's image.tolist()
        (_json_image(1024, 1024, ["MASK"]), {}),  # and flat, as tritonclient sends it
        _binary_image(3000, 3400),  # ~30 MB of binary tensor, under MAX_UPLOAD_BYTES
        (_base64_file(5_500_000), {}),  # ~7.3 MB of base64, under MAX_JSON_BYTES
    ]
    server = ServerProcess(tiny_artifact, tmp_path, CHANSEG_LOG_LEVEL="warning")
    try:
        server.wait_ready()
        probe = subprocess.Popen(
            [sys.executable, "-c", PROBE, str(server.port), str(server.proc.pid), "12"],
            stdout=subprocess.PIPE,
            text=True,
        )
        statuses = []

        def send(body, headers):
            for _ in range(3):
                r = httpx.post(
                    server.url + "/v2/models/tiny/infer", content=body, headers=headers, timeout=120
                )
                statuses.append(r.status_code)

        senders = [threading.Thread(target=send, args=b) for b in bodies]
        for t in senders:
            t.start()
        out, _ = probe.communicate(timeout=120)
        for t in senders:
            t.join(120)
    finally:
        server.stop()
    probes = json.loads(out)  # (wall ms, event-loop CPU ms) per /healthz
    walls = sorted(wall for wall, _ in probes)
    cpus = sorted(cpu for _, cpu in probes)
    print(
        f"\n/healthz while parsing and encoding: {len(probes)} probes, wall median {walls[len(walls) // 2]:.1f} ms,"
        f" max {walls[-1]:.1f} ms; event-loop CPU within one probe: the two most {cpus[-1]:.1f} and {cpus[-2]:.1f} ms"
    )
    assert statuses == [200] * 15, (statuses, server.log.read_text()[-3000:])
    assert len(probes) > 100
    # The loop's own CPU time within one probe: what work on the loop delays a probe by,
    # and what a descheduled server or probe does not inflate (that shows in wall time
    # only). Here the most is 12-33 ms and the fourth most 6-16 (reading the 30 MB body
    # and its page faults, 2,000-7,300 in one probe); with the I/O pool's stages run on
    # the loop instead, the fifth most is 95-98 ms, since each of the 9 requests blocks
    # it. A few probes alone say little: CPU time stretches when the machine's cores are
    # slow (a full-suite run here: four probes at 30-52 ms), and one run in ~30 shows a
    # single probe at ~100 ms that no instrumented run has caught. So the check is on
    # the fifth most.
    assert cpus[-5] < 40, sorted(probes, key=lambda p: -p[1])[:10]
    # Wall time: the kubelet's readiness probe gives up after 1 s (its default), and
    # one failure takes the pod out of the Service (deploy/k8s); here the median is
    # under 1 ms, the worst 15-220 ms (scheduling on 2 vCPUs).
    assert walls[len(walls) // 2] < 10 and walls[-1] < 1000, walls[-10:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eight_json_images_at_once_are_all_served(tiny_artifact, tmp_path):
    """Issue 34: eight 1024x1024 JSON images at once each held their parse's reservation
    (12x the JSON) while waiting for decoding memory: the work budget was full of waiters,
    and all eight got 503 or 504 at their deadline. The reservation shrinks to the pixels
    once the tensor is read."""
    body = _json_image(1024, 1024, ["MASK"], nested=True)
    server = ServerProcess(tiny_artifact, tmp_path, CHANSEG_LOG_LEVEL="warning")
    try:
        server.wait_ready()
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda _: httpx.post(server.url + "/v2/models/tiny/infer", content=body, timeout=120),
                    range(8),
                )
            )
    finally:
        server.stop()
    assert [r.status_code for r in answers] == [200] * 8, [
        r.text[:100] for r in answers if r.status_code != 200
    ]
