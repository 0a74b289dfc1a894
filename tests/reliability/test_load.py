"""Held load and overload against a real server process."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.reliability.conftest import duration, hold, report, statuses_only

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def test_held_load_at_80_percent_of_capacity(server, payloads, capacity):
    """~80% of capacity (Poisson arrivals): no errors, p99 inside the deadline."""
    seconds = duration(10, 60)
    m = hold(server.url, payloads, 0.8 * capacity, seconds)
    report(
        "held load", seconds=seconds, rate=0.8 * capacity, answered=m.requests, images_per_s=m.images_per_s,
        p50_ms=m.p50_ms, p99_ms=m.p99_ms, statuses=m.statuses,
    )  # fmt: skip
    assert m.requests >= 0.5 * 0.8 * capacity * seconds
    assert m.statuses == {"200": m.ok} and m.errors == 0 and m.skipped == 0
    assert m.p99_ms < 30_000  # REQUEST_TIMEOUT_S


def _c1_p50(url: str, body) -> float:
    with httpx.Client(base_url=url, timeout=30) as client:
        times = []
        for _ in range(7):
            t = time.perf_counter()
            assert (
                client.post(
                    "/predict?format=png", content=body.body, headers={"content-type": body.content_type}
                ).status_code
                == 200
            )
            times.append((time.perf_counter() - t) * 1000)
    return sorted(times)[len(times) // 2]


def test_overload_3x_capacity_gets_fast_503s_and_recovers(server, payloads, capacity):
    """3x capacity: every request answered, 200 or a fast 503 with Retry-After;
    memory flat; normal latency again within 5 s of the burst's end."""
    baseline_ms = _c1_p50(server.url, payloads[0])
    # At 3x capacity the queue grows at 2x capacity: this long fills it (64 images).
    fill_s = 64 / (2 * capacity) + 1
    hold(
        server.url, payloads, 3 * capacity, max(2.0, fill_s), windows=1
    )  # warm-up: the full queue's buffers exist
    time.sleep(64 / capacity + 1)  # drained
    rss_before = server.rss_kb()
    # Long enough for the queue to fill with half the window left: 6 s where the
    # model does ~20 images/s, more on a slower day.
    seconds = max(duration(6, 20), 2 * fill_s)
    m = hold(server.url, payloads, 3 * capacity, seconds, timeout_s=60)
    rss_after = server.rss_kb()
    ended = time.perf_counter()
    recovered_after = None
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while time.perf_counter() - ended < 10:
            t = time.perf_counter()
            r = client.post(
                "/predict?format=png",
                content=payloads[1].body,
                headers={"content-type": payloads[1].content_type},
            )
            if r.status_code == 200 and (time.perf_counter() - t) * 1000 <= 1.5 * baseline_ms + 20:
                recovered_after = time.perf_counter() - ended
                break
    report(
        "overload", seconds=seconds, rate=3 * capacity, statuses=m.statuses, p99_ms=m.p99_ms,
        rejected_p99_ms=m.rejected_p99_ms, rejected_max_ms=m.rejected_max_ms,
        rss_mb_before=rss_before / 1024, rss_mb_after=rss_after / 1024, recovered_after_s=recovered_after,
        baseline_c1_ms=baseline_ms,
    )  # fmt: skip
    assert statuses_only(m.statuses, {"200", "503"}), m.statuses
    assert m.statuses.get("503", 0) > 0 and m.ok > 0  # it was overloaded, and still served
    assert m.errors == 0  # no client-side timeouts or resets
    assert m.rejected_without_retry_after == 0
    assert m.rejected_p99_ms < 50
    assert m.p99_ms < 30_000
    assert rss_after < 1.10 * rss_before  # memory flat: under 10% growth after the warm-up burst
    assert recovered_after is not None and recovered_after < 5, recovered_after
