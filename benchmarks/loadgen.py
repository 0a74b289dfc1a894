"""A bounded HTTP load generator that follows perf_analyzer's method.

Load: closed loop (``concurrency`` clients, each sends its next request when
the last one is answered) or open loop (requests start at a fixed rate,
evenly spaced or as Poisson arrivals, whether or not earlier ones finished).

Measurement: after ``warmup_s``, windows of ``window_s``; a request counts in
the window in which its answer arrived. Windows repeat until the last
``stable_windows`` agree within ``stability`` (max - min over mean) on
throughput and p95, or until ``max_windows``: then the result says
"unstable". Figures are over those last windows. When the server exposes
chanseg's ``/metrics``, the server-side split (queue wait, inference time per
batch, batch size) is read before and after them; given the server's process
group, so is its CPU time, by thread role (``benchmarks.cpu``).

Bounds: at most ``max_requests`` requests and ``warmup_s + max_windows *
window_s`` seconds per measurement, plus up to ``drain_s`` for the requests in
flight at the end to be answered (then they are cancelled); only loopback
addresses. The requests are prepared bytes sent over keep-alive connections by
a minimal HTTP/1.1 client (``benchmarks.client``): the client runs on the same machine
as the server under test, so its CPU per request is kept small and reported.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --concurrency 1 4 16
    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --rate 10 --poisson
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import httpx
import numpy as np

from benchmarks.client import Client, Payload, multipart, require_loopback
from benchmarks.cpu import group_cpu, per_image
from testbed.images import IMAGE_SETS
from testbed.metrics import metric_samples, metric_total

__all__ = ["Measurement", "Window", "is_stable", "measure", "percentile", "run", "server_split"]


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


@dataclass
class Sample:
    sent: float
    done: float
    status: str  # HTTP status, or "error" (transport error or client timeout)
    retry_after: bool = False  # the answer carried Retry-After

    @property
    def ms(self) -> float:
        return (self.done - self.sent) * 1000


@dataclass
class Window:
    start: float
    seconds: float
    ok: int
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass
class Measurement:
    mode: str  # "concurrency" or "rate"
    load: float  # the concurrency, or the request rate (1/s)
    status: str  # "stable" or "unstable"
    windows: List[Window]
    seconds: float  # length of the windows the figures come from
    requests: int
    ok: int
    statuses: Dict[str, int]
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    rejected_p99_ms: float  # non-200 answers (a 503 should be fast)
    rejected_max_ms: float
    rejected_without_retry_after: int
    errors: int  # transport errors and client-side timeouts
    skipped: int  # open loop: arrivals not sent because max_inflight were pending
    client_cpu_ms_per_request: float
    server: Optional[dict] = None  # queue/inference split from /metrics
    server_cpu: Optional[dict] = None  # ms per image, per role and total (benchmarks.cpu), given server_pgid
    latencies_ms: List[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("latencies_ms")
        return data


@dataclass
class _Mark:
    """The state at a window boundary."""

    at: float  # time.perf_counter()
    answered: int  # requests answered so far
    cpu_s: float  # the client's CPU time so far
    scrape: Optional[dict]  # chanseg's histogram sums and counts
    server_cpu: Optional[dict] = None  # the server's CPU so far, less our scrapes', by role


_SERVER_METRICS = {
    "chanseg_queue_wait_seconds": "queue",
    "chanseg_inference_duration_seconds": "inference",
    "chanseg_batch_size": "batch",
}


async def _scrape(client: httpx.AsyncClient) -> Optional[Dict[str, float]]:
    """Sums and counts of chanseg's batching histograms, or None (not chanseg)."""
    try:
        r = await client.get("/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    samples = metric_samples(r.text)
    values: Dict[str, float] = {}
    for family, key in _SERVER_METRICS.items():
        for part in ("sum", "count"):
            if any(name == f"{family}_{part}" for name, _ in samples):
                values[f"{key}_{part}"] = metric_total(samples, f"{family}_{part}")
    return values or None


def server_split(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    """Mean queue wait per image, inference per batch and batch size between two scrapes."""
    if not before or not after:
        return None

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = delta("inference_count")
    images = delta("queue_count")
    if batches <= 0 or images <= 0:
        return None
    return {
        "queue_ms": 1000 * delta("queue_sum") / images,
        "inference_ms_per_batch": 1000 * delta("inference_sum") / batches,
        "batch_size": delta("batch_sum") / max(1.0, delta("batch_count")),
        "batches": int(batches),
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _window(samples: List[Sample], start: float, seconds: float) -> Window:
    ok = [s.ms for s in samples if s.status == "200"]
    return Window(
        start=start,
        seconds=seconds,
        ok=len(ok),
        images_per_s=len(ok) / seconds,
        p50_ms=percentile(ok, 50),
        p95_ms=percentile(ok, 95),
        p99_ms=percentile(ok, 99),
    )


def _spread(values: Sequence[float]) -> float:
    if any(np.isnan(v) for v in values):
        return float("inf")
    mean = float(np.mean(values))
    return (max(values) - min(values)) / mean if mean > 0 else float("inf")


def is_stable(windows: Sequence[Window], count: int = 3, tolerance: float = 0.10) -> bool:
    """The last ``count`` windows agree within ``tolerance`` on throughput and p95."""
    if len(windows) < count:
        return False
    last = windows[-count:]
    return (
        _spread([w.images_per_s for w in last]) <= tolerance
        and _spread([w.p95_ms for w in last]) <= tolerance
    )


async def measure(
    url: str,
    payloads: Sequence[Payload],
    concurrency: Optional[int] = None,
    rate: Optional[float] = None,
    poisson: bool = False,
    path: str = "/predict?format=png",
    window_s: float = 5.0,
    warmup_s: float = 2.0,
    stable_windows: int = 3,
    stability: float = 0.10,
    max_windows: int = 8,
    max_requests: int = 200_000,
    max_inflight: int = 1024,
    timeout_s: float = 60.0,
    drain_s: float = 10.0,
    seed: int = 0,
    client=None,
    server_pgid: Optional[int] = None,
) -> Measurement:
    """One load level (``concurrency`` or ``rate``), measured in windows until stable.
    ``client``: what sends the requests (``prepare``, ``send``, ``close``); default an
    HTTP :class:`~benchmarks.client.Client` to ``url`` + ``path`` (``url`` is scraped for
    the server's own split either way). ``server_pgid``: the server's process group,
    whose CPU time per image over the same windows is ``server_cpu``."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give either concurrency or rate")
    if (concurrency is not None and concurrency < 1) or (rate is not None and rate <= 0):
        raise ValueError("concurrency must be >= 1 and rate > 0")
    require_loopback(url)
    samples: List[Sample] = []
    sent = skipped = 0
    stop = asyncio.Event()
    client = client or Client(url, path, timeout_s)
    requests = [client.prepare(p) for p in payloads]

    async with httpx.AsyncClient(base_url=url, timeout=10) as scraper:

        async def one(index: int) -> None:
            t = time.perf_counter()
            status, retry_after = await client.send(requests[index % len(requests)])
            samples.append(Sample(t, time.perf_counter(), status, retry_after))

        async def closed_worker(index: int) -> None:
            nonlocal sent
            while not stop.is_set() and sent < max_requests:
                sent += 1
                await one(index)
                index += concurrency

        async def open_arrivals() -> None:
            nonlocal sent, skipped
            rng = random.Random(seed)
            inflight: set = set()
            next_at = time.perf_counter()
            while not stop.is_set() and sent < max_requests:
                next_at += rng.expovariate(rate) if poisson else 1.0 / rate
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                if len(inflight) >= max_inflight:
                    skipped += 1
                    continue
                task = asyncio.create_task(one(sent))
                sent += 1
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            if inflight:
                await asyncio.wait(list(inflight), timeout=drain_s)
            for task in list(inflight):
                task.cancel()

        if concurrency is not None:
            tasks = [asyncio.create_task(closed_worker(i)) for i in range(concurrency)]
        else:
            tasks = [asyncio.create_task(open_arrivals())]
        windows: List[Window] = []
        marks: List[_Mark] = []
        scrapes_cpu: Dict[str, float] = {}  # the server's CPU answering our scrapes so far, by role

        async def mark() -> None:
            # Time, count and CPU together, before the scrape's await lets answers in:
            # samples[a.answered:b.answered] are then exactly the answers between a and b.
            at, answered, cpu_s = time.perf_counter(), len(samples), _cpu_seconds()
            server_cpu = group_cpu(server_pgid) if server_pgid is not None else None
            scrape = await _scrape(scraper)
            if server_cpu is not None:
                # The server's CPU less what it spent answering the scrapes: ~2.4 ms of its
                # event loop each, one a window (~0.1 ms an image in 2 s windows at ~12
                # images/s). Answers that arrive during a scrape keep their count but not
                # that stretch's CPU (~3 ms of a window).
                scraped = group_cpu(server_pgid)
                net = {role: seconds - scrapes_cpu.get(role, 0.0) for role, seconds in server_cpu.items()}
                if scraped is not None:
                    for role, seconds in scraped.items():
                        scrapes_cpu[role] = scrapes_cpu.get(role, 0.0) + seconds - server_cpu.get(role, 0.0)
                server_cpu = net
            marks.append(_Mark(at, answered, cpu_s, scrape, server_cpu))

        try:
            await asyncio.sleep(warmup_s)
            await mark()
            while len(windows) < max_windows and sent < max_requests:
                await asyncio.sleep(max(0.0, marks[-1].at + window_s - time.perf_counter()))
                await mark()
                a, b = marks[-2], marks[-1]
                windows.append(_window(samples[a.answered : b.answered], a.at, b.at - a.at))
                if is_stable(windows, stable_windows, stability):
                    break
        finally:
            stop.set()  # closed-loop clients stop after their current answer
            _, pending = await asyncio.wait(tasks, timeout=drain_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            client.close()

    used = min(stable_windows, len(windows))
    first, last = marks[-used - 1], marks[-1]
    seconds = last.at - first.at
    chosen = samples[first.answered : last.answered]
    ok = [s.ms for s in chosen if s.status == "200"]
    rejected = [s.ms for s in chosen if s.status not in ("200", "error")]
    statuses: Dict[str, int] = {}
    for s in chosen:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    return Measurement(
        mode="concurrency" if concurrency is not None else "rate",
        load=float(concurrency if concurrency is not None else rate),
        status="stable" if is_stable(windows, stable_windows, stability) else "unstable",
        windows=windows,
        seconds=seconds,
        requests=len(chosen),
        ok=len(ok),
        statuses=statuses,
        images_per_s=len(ok) / seconds,
        p50_ms=percentile(ok, 50),
        p90_ms=percentile(ok, 90),
        p95_ms=percentile(ok, 95),
        p99_ms=percentile(ok, 99),
        mean_ms=float(np.mean(ok)) if ok else float("nan"),
        rejected_p99_ms=percentile(rejected, 99),
        rejected_max_ms=max(rejected, default=float("nan")),
        rejected_without_retry_after=sum(
            1 for s in chosen if s.status not in ("200", "error") and not s.retry_after
        ),
        errors=statuses.get("error", 0),
        skipped=skipped,
        client_cpu_ms_per_request=1000 * (last.cpu_s - first.cpu_s) / max(1, len(chosen)),
        server=server_split(first.scrape, last.scrape),
        server_cpu=per_image(first.server_cpu, last.server_cpu, len(ok)),
        latencies_ms=ok,
    )


def run(coro):
    """Run ``coro`` on uvloop when installed (less client CPU per request), else asyncio."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, nargs="+")
    load.add_argument("--rate", type=float, nargs="+", help="open loop: requests per second")
    parser.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals")
    parser.add_argument("--images", choices=list(IMAGE_SETS), default="png256")
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--out", help="write results as JSON here")
    args = parser.parse_args()
    images = IMAGE_SETS[args.images]()
    payloads = [multipart(b) for b in images]
    levels = [("concurrency", c) for c in (args.concurrency or [])] + [("rate", r) for r in (args.rate or [])]
    results = []
    for kind, value in levels or [("concurrency", 1), ("concurrency", 4), ("concurrency", 16)]:
        options = {kind: value}
        m = run(
            measure(
                args.url,
                payloads,
                poisson=args.poisson,
                window_s=args.window,
                warmup_s=args.warmup,
                max_windows=args.max_windows,
                **options,
            )
        )
        results.append(m.summary())
        print(
            f"{kind} {value:g}: {m.images_per_s:.2f} img/s, p50 {m.p50_ms:.0f} p95 {m.p95_ms:.0f} "
            f"p99 {m.p99_ms:.0f} ms, {m.statuses}, {m.status}",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
