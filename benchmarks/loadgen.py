"""A bounded HTTP load generator for chanseg (closed loop, loopback only).

Each of ``concurrency`` workers sends a request, waits for the answer, sends
the next, for ``duration_s`` after ``warmup_s`` (warm-up answers are not
counted). Every run is bounded in time and in request count, and refuses any
host that is not a loopback address.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --concurrency 1 4 16 64
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence
from urllib.parse import urlparse

import httpx
import numpy as np

__all__ = ["RunResult", "closed_loop", "make_png_bodies", "require_loopback", "percentile"]


def require_loopback(url: str) -> None:
    """Raise unless ``url``'s host resolves to loopback addresses only."""
    host = urlparse(url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(
            f"{url}: the load generator only talks to loopback addresses, not {sorted(addresses)}"
        )


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def make_png_bodies(count: int = 16, size: int = 256, seed: int = 0, fmt: str = "PNG") -> List[bytes]:
    """Synthetic-shapes images (what the default model knows), encoded."""
    import io

    from PIL import Image

    from model.data import synthetic_sample

    bodies = []
    for i in range(count):
        image = Image.fromarray(synthetic_sample(seed + 100, i, (size, size)).image)
        buf = io.BytesIO()
        image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        bodies.append(buf.getvalue())
    return bodies


@dataclass
class RunResult:
    concurrency: int
    duration_s: float
    requests: int
    ok: int
    statuses: Dict[str, int]
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    rejected_p99_ms: float  # latency of non-200 answers (503s should be fast)
    errors: int  # transport errors / client timeouts
    latencies_ms: List[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("latencies_ms")
        return data


async def closed_loop(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    max_requests: int = 100_000,
    timeout_s: float = 60.0,
    content_type: str = "image/png",
    path: str = "/predict?format=png",
) -> RunResult:
    """``concurrency`` clients in a closed loop; counts answers after the warm-up."""
    require_loopback(url)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: List[float] = []
    rejected: List[float] = []
    statuses: Dict[str, int] = {}
    errors = 0
    sent = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as client:

        async def worker(index: int) -> None:
            nonlocal errors, sent
            i = index
            while time.perf_counter() < stop_at and sent < max_requests:
                sent += 1
                body = bodies[i % len(bodies)]
                i += concurrency
                t = time.perf_counter()
                try:
                    r = await client.post(path, content=body, headers={"content-type": content_type})
                    status = str(r.status_code)
                except httpx.HTTPError:
                    status = "error"
                done = time.perf_counter()
                if t < measure_from or done > stop_at:
                    continue
                statuses[status] = statuses.get(status, 0) + 1
                if status == "200":
                    latencies.append((done - t) * 1000)
                elif status == "error":
                    errors += 1
                else:
                    rejected.append((done - t) * 1000)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    ok = len(latencies)
    return RunResult(
        concurrency=concurrency,
        duration_s=duration_s,
        requests=sum(statuses.values()),
        ok=ok,
        statuses=statuses,
        images_per_s=ok / duration_s,
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        p95_ms=percentile(latencies, 95),
        p99_ms=percentile(latencies, 99),
        mean_ms=statistics.fmean(latencies) if latencies else float("nan"),
        rejected_p99_ms=percentile(rejected, 99),
        errors=errors,
        latencies_ms=latencies,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", help="write results as JSON here")
    args = parser.parse_args()
    bodies = make_png_bodies(size=args.size)
    results = []
    for c in args.concurrency:
        result = asyncio.run(closed_loop(args.url, bodies, c, args.duration, args.warmup))
        results.append(result.summary())
        print(json.dumps(result.summary()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
