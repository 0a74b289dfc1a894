"""Drain: SIGTERM under load; everything the server accepted is answered."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid

import httpx
import pytest

from testbed.images import make_images
from tests.reliability.conftest import duration, report, start_server

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def test_sigterm_under_load_answers_every_accepted_request(tmp_path):
    server = start_server(
        tmp_path, CHANSEG_LOG_LEVEL="info", CHANSEG_LOG_FORMAT="json", CHANSEG_DRAIN_TIMEOUT_S="20"
    )
    body = make_images(1, 256)[0]
    outcomes: dict = {}  # request id -> status code or the transport error's type
    stop = threading.Event()

    def client() -> None:
        # One connection per request: a refused connection is then unambiguous.
        while not stop.is_set():
            rid = uuid.uuid4().hex
            try:
                r = httpx.post(
                    server.url + "/predict?format=png", content=body, timeout=60,
                    headers={"content-type": "image/png", "x-request-id": rid, "connection": "close"},
                )  # fmt: skip
                outcomes[rid] = r.status_code
            except httpx.TransportError as exc:
                outcomes[rid] = type(exc).__name__
                if isinstance(exc, httpx.ConnectError):
                    time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(duration(3, 10))
        sent_signal = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(40)
        exited_after = time.monotonic() - sent_signal
    finally:
        stop.set()
        for t in threads:
            t.join(70)
        server.stop()
    log = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    served = {e["request_id"]: e["status"] for e in log if e.get("logger") == "chanseg.access"}
    counts: dict = {}
    for v in outcomes.values():
        counts[str(v)] = counts.get(str(v), 0) + 1
    report("drain", exit_code=code, exited_after_s=exited_after, outcomes=counts, served=len(served))
    assert code == 0 and exited_after < 20 + 5
    assert counts.get("200", 0) > 0 and "draining" in server.log.read_text()
    # Every request the server handled reached its client with the server's status...
    for rid, status in served.items():
        assert outcomes.get(rid) == status, (rid, status, outcomes.get(rid))
    # ...the server answered only 200s and 503s...
    assert set(served.values()) <= {200, 503}, set(served.values())
    # ...and a client saw a transport error only for requests the server never took.
    lost = [rid for rid, v in outcomes.items() if isinstance(v, str) and rid in served]
    assert not lost, lost
