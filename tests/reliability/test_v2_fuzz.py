"""v2 bodies fuzzed against a live ``python -m service``: random JSON documents,
datatypes, shapes, binary tails and header lengths (the strategies of
tests/service/test_v2_codec.py), sent over real HTTP. Every answer is a 200 or a
4xx with ``{"error"}``; the server stays healthy. Short form in ``make test-all``,
1,500 bodies with ``CHANSEG_RELIABILITY=long``."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.reliability.conftest import LONG, report, start_server
from tests.service.test_v2_codec import requests

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


@pytest.fixture(scope="module")
def live(tiny_artifact, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("v2fuzz"), CHANSEG_MODEL_PATH=tiny_artifact)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield server, client
    finally:
        server.stop()


def test_random_v2_bodies_over_http_are_200_or_4xx(live):
    server, client = live
    seen: dict = {}

    @given(request=requests())
    @settings(
        max_examples=1500 if LONG else 100,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(request):
        body, header_length = request
        headers = {}
        if header_length is not None:  # what an HTTP client can send as a header value
            printable = "".join(ch for ch in header_length if " " <= ch <= "~")  # no CR, LF or other controls
            headers["inference-header-content-length"] = printable.strip() or "x"
        r = client.post("/v2/models/tiny/infer", content=body, headers=headers)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
        assert r.status_code == 200 or r.headers.get("content-type") == "application/json", (
            r.status_code, dict(r.headers), r.text[:200], headers, body[:200],
        )  # fmt: skip
        assert r.status_code == 200 or "error" in r.json()

    check()
    report("v2 fuzzing over HTTP", bodies=sum(seen.values()), statuses=dict(sorted(seen.items())))
    assert client.get("/healthz").status_code == 200
    assert "Traceback" not in server.log.read_text()
