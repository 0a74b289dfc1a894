"""The load generator: windows, stability, bounds, open loop, loopback only."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.client import multipart, require_loopback
from benchmarks.loadgen import Window, is_stable, measure, server_split
from testbed.images import make_images


def _w(ips: float, p95: float) -> Window:
    return Window(start=0, seconds=1, ok=int(ips), images_per_s=ips, p50_ms=p95 / 2, p95_ms=p95, p99_ms=p95)


def test_stability_needs_three_windows_agreeing_on_throughput_and_p95():
    assert not is_stable([_w(10, 100), _w(10, 100)])
    assert is_stable([_w(3, 900), _w(10, 100), _w(10.4, 104), _w(10.2, 98)])
    assert not is_stable([_w(10, 100), _w(12, 100), _w(10, 100)])  # throughput spread 19%
    assert not is_stable([_w(10, 100), _w(10, 130), _w(10, 100)])  # p95 spread 27%
    assert not is_stable([_w(0, float("nan"))] * 3)  # no answers is not stable


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://[2001:db8::1]:80", "http://8.8.8.8"])
def test_refuses_non_loopback_targets(url):
    with pytest.raises(ValueError, match="loopback"):
        require_loopback(url)
    payload = multipart(b"x")
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(measure(url, [payload], concurrency=1, window_s=0.1, warmup_s=0, max_windows=1))


def test_loopback_names_pass():
    require_loopback("http://127.0.0.1:1")
    require_loopback("http://localhost:1")


def test_server_split_from_two_scrapes():
    before = {"queue_sum": 1.0, "queue_count": 10, "inference_sum": 2.0, "inference_count": 5,
              "batch_sum": 10, "batch_count": 5}  # fmt: skip
    after = {"queue_sum": 1.5, "queue_count": 20, "inference_sum": 2.4, "inference_count": 9,
             "batch_sum": 20, "batch_count": 9}  # fmt: skip
    split = server_split(before, after)
    assert split == pytest.approx(
        {"queue_ms": 50.0, "inference_ms_per_batch": 100.0, "batch_size": 2.5, "batches": 4}
    )
    assert server_split(None, after) is None
    assert server_split(after, after) is None  # nothing happened in between


@pytest.mark.slow
def test_closed_loop_against_a_real_server(chanseg_url):
    payloads = [multipart(img) for img in make_images(4, 64)]
    m = asyncio.run(
        measure(
            chanseg_url, payloads, concurrency=3, window_s=0.6, warmup_s=0.3, max_windows=4, stability=0.5
        )
    )
    assert m.statuses == {"200": m.ok} and m.ok > 3
    assert 1 <= len(m.windows) <= 4 and m.status in ("stable", "unstable")
    assert m.p50_ms <= m.p95_ms <= m.p99_ms
    assert m.images_per_s == pytest.approx(m.ok / m.seconds)
    # chanseg's own /metrics: batches of one (MAX_BATCH_SIZE=1), some inference time.
    assert m.server["batch_size"] == 1.0 and m.server["inference_ms_per_batch"] > 0
    assert m.client_cpu_ms_per_request > 0


@pytest.mark.slow
def test_request_count_bound(chanseg_url):
    payloads = [multipart(make_images(1, 64)[0])]
    m = asyncio.run(
        measure(
            chanseg_url, payloads, concurrency=2, window_s=0.5, warmup_s=0, max_windows=20, max_requests=12
        )
    )
    assert m.requests <= 12 and sum(w.ok for w in m.windows) <= 12


@pytest.mark.slow
def test_open_loop_poisson_rate(chanseg_url):
    payloads = [multipart(img) for img in make_images(2, 64)]
    m = asyncio.run(
        measure(
            chanseg_url, payloads, rate=30, poisson=True, window_s=1.0, warmup_s=0.3, max_windows=3,
            stable_windows=3, stability=float("inf"),
        )
    )  # fmt: skip
    assert m.mode == "rate" and m.load == 30
    # Poisson arrivals at 30/s for 3 s: ~90 answers (tiny model, never the bottleneck).
    assert 50 <= m.ok <= 140 and m.skipped == 0 and m.errors == 0


def test_load_arguments_checked():
    with pytest.raises(ValueError):
        asyncio.run(measure("http://127.0.0.1:1", [multipart(b"x")], concurrency=2, rate=3))
    with pytest.raises(ValueError):
        asyncio.run(measure("http://127.0.0.1:1", [multipart(b"x")]))


def test_the_servers_cpu_per_image_leaves_out_the_scrapes(monkeypatch):
    """Each window's end scrapes /metrics, and what the server spends answering that is
    the benchmark's, not the images': a server that spends 1 ms of its event loop per
    request and 1 s per scrape shows 1 ms per image."""
    from benchmarks import loadgen

    cpu = {"inference": 0.0, "io": 0.0, "main": 0.0, "other": 0.0, "total": 0.0}

    def spend(seconds: float) -> None:
        cpu["main"] += seconds
        cpu["total"] += seconds

    async def scrape(client):
        spend(1.0)
        return None

    class Server:
        def prepare(self, payload):
            return payload

        async def send(self, request):
            await asyncio.sleep(0.002)
            spend(0.001)
            return "200", False

        def close(self):
            pass

    monkeypatch.setattr(loadgen, "_scrape", scrape)
    monkeypatch.setattr(loadgen, "group_cpu", lambda pgid: dict(cpu))
    m = asyncio.run(
        measure(
            "http://127.0.0.1:1", [multipart(b"x")], concurrency=2, window_s=0.2, warmup_s=0.05,
            max_windows=3, stability=float("inf"), client=Server(), server_pgid=1,
        )
    )  # fmt: skip
    assert len(m.windows) == 3 and m.ok > 30
    assert m.server_cpu["main"] == pytest.approx(1.0) and m.server_cpu["total"] == pytest.approx(1.0)
