"""Before/after: ``POST /predict`` on an earlier commit and on the working tree, measured
in one run.

``python -m benchmarks.ab HEAD~1 --images png256 jpeg1024 --requests 300``
``python -m benchmarks.ab HEAD~1 --host 16 --images png256 --requests 200 --rounds 4``

The earlier commit is checked out in a temporary git worktree; both servers run
the same model with the same settings, side by side.

- Latency (the default): they are asked in turn (one request at a time, the order
  swapped every round), so that the machine's drift falls on both alike. Prints per
  image set the median and p90 of each and the difference of the medians; the first
  tenth of the requests is warm-up.
- ``--host N``: the host's work per image at concurrency N. Each round sends
  ``--requests`` images to one server, then to the other (the order swapped every
  round), and reads each server's CPU from ``/proc`` by thread (``benchmarks.cpu``):
  per image, the host's (everything but the inference threads: decoding, encoding,
  HTTP, the event loop), the I/O threads', the event loop's and inference's, and
  img/s. Prints the median of the rounds and the ratio of the hosts' figures.
- ``--model small`` or ``--model null``: both servers run a stand-in whose inference
  leaves the host's work in view (``benchmarks.hostbound``), made in the temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import httpx
import numpy as np

from benchmarks.client import Client, multipart
from benchmarks.cpu import group_cpu
from testbed.images import IMAGE_SETS
from testbed.processes import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]


def measure(urls: Dict[str, str], bodies: List[bytes], requests: int, query: str) -> Dict[str, List[float]]:
    latency: Dict[str, List[float]] = {name: [] for name in urls}
    with httpx.Client(timeout=120) as client:
        for i in range(requests):
            order = list(urls.items()) if i % 2 else list(urls.items())[::-1]
            for name, url in order:
                started = time.perf_counter()
                r = client.post(url + "/predict" + query, files={"file": ("image", bodies[i % len(bodies)])})
                latency[name].append((time.perf_counter() - started) * 1000)
                r.raise_for_status()
    return latency


def host_rounds(
    urls: Dict[str, str], pgids: Dict[str, int], bodies: List[bytes], requests: int, rounds: int,
    concurrency: int, query: str,
) -> Dict[str, Dict[str, float]]:  # fmt: skip
    """Per server, the medians over ``rounds`` of its CPU per image by role, ``host`` and img/s."""
    paths = {name: "/predict" + (query or "?format=png") for name in urls}
    rows: Dict[str, List[Dict[str, float]]] = {name: [] for name in urls}

    async def load(name: str) -> float:
        client = Client(urls[name], paths[name], 120)
        prepared = [client.prepare(multipart(b)) for b in bodies]
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while sent < requests:
                index, sent = sent, sent + 1
                status, _ = await client.send(prepared[index % len(prepared)])
                if status != "200":
                    raise RuntimeError(f"{name}: {status}")

        started = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            client.close()
        return time.perf_counter() - started

    for name in urls:  # warm-up
        asyncio.run(_quietly(load(name)))
    for r in range(rounds):
        for name in list(urls)[:: 1 if r % 2 == 0 else -1]:
            before = group_cpu(pgids[name])
            seconds = asyncio.run(load(name))
            after = group_cpu(pgids[name])
            per = {k: 1000 * (after[k] - before[k]) / requests for k in after}
            per["host"], per["img/s"] = per["total"] - per["inference"], requests / seconds
            rows[name].append(per)
    return {name: {k: statistics.median(r[k] for r in got) for k in got[0]} for name, got in rows.items()}


async def _quietly(coro):
    try:
        return await coro
    except RuntimeError:
        return None


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", help="the earlier commit (any git revision)")
    parser.add_argument("--images", nargs="+", choices=list(IMAGE_SETS), default=["png256"])
    parser.add_argument("--requests", type=int, default=200, help="per server and image set")
    parser.add_argument("--query", default="", help="appended to /predict, e.g. '?format=rle'")
    parser.add_argument(
        "--model",
        help="CHANSEG_MODEL_PATH (default: the bundled model), or small or null: the stand-ins "
        "benchmarks.hostbound makes, for the host's work as on a GPU host",
    )
    parser.add_argument(
        "--host", type=int, metavar="N", help="host CPU per image at concurrency N, not latency"
    )
    parser.add_argument("--rounds", type=int, default=4, help="--host: rounds of each server")
    parser.add_argument(
        "--after-env", nargs="+", default=[], metavar="NAME=VALUE",
        help="settings for the working tree's server only, e.g. CHANSEG_TRACING=true (a setting's cost, same code)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    env = {"CHANSEG_DEVICE": "cpu", "CHANSEG_MAX_BATCH_SIZE": "4", "CHANSEG_LOG_LEVEL": "warning"}
    with tempfile.TemporaryDirectory(prefix="chanseg-ab-") as tmp:
        if args.model:
            from benchmarks import hostbound  # torch: only when a model is named

            stand_in = args.model in hostbound.KINDS
            path = hostbound.make(args.model, Path(tmp) / f"{args.model}.pt") if stand_in else args.model
            env["CHANSEG_MODEL_PATH"] = str(path)
        before = Path(tmp) / "before"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before), args.before],
            check=True,
        )
        started = []
        try:
            after_env = dict(item.split("=", 1) for item in args.after_env)
            started.append(ServiceProcess(env, root=before))
            started.append(ServiceProcess({**env, **after_env}, root=ROOT))
            for proc in started:
                proc.wait_ready(600)
            after = "after (working tree" + (", " + " ".join(args.after_env) if args.after_env else "") + ")"
            urls = {f"before ({args.before})": started[0].url, after: started[1].url}
            if args.host:
                pgids = dict(zip(urls, (proc.proc.pid for proc in started)))
                for name in args.images:
                    found = host_rounds(
                        urls, pgids, IMAGE_SETS[name](), args.requests, args.rounds, args.host, args.query
                    )
                    for k, v in found.items():
                        cells = ", ".join(
                            f"{role} {v[role]:.2f}" for role in ("host", "io", "main", "inference")
                        )
                        print(f"{name:10} c{args.host} {k:40} ms/image: {cells}; {v['img/s']:.2f} img/s")
                    before_ms, after_ms = (v["host"] for v in found.values())
                    print(f"{name:10} host after / before: {after_ms / before_ms:.2f}")
                return 0
            for name in args.images:
                latency = measure(urls, IMAGE_SETS[name](), args.requests, args.query)
                skip = args.requests // 10
                medians = {k: statistics.median(v[skip:]) for k, v in latency.items()}
                for k, v in latency.items():
                    print(
                        f"{name:10} {k:40} median {medians[k]:7.2f} ms   p90 {np.percentile(v[skip:], 90):7.2f} ms"
                    )
                before_ms, after_ms = medians.values()
                print(
                    f"{name:10} after - before: {after_ms - before_ms:+.2f} ms ({after_ms / before_ms - 1:+.1%})"
                )
        finally:
            for proc in started:
                proc.stop()
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
