"""The service against the raw model, in one run on one machine.

1. Raw ceiling: ``Segmenter.predict`` on decoded 256x256 images at its best
   batch size, no HTTP (the most any server can deliver here).
2. ``python -m service`` on a loopback port (default settings unless given),
   driven by ``benchmarks.loadgen`` at concurrency 1, 4, 16 and 64 with PNGs.

Prints a table and the issue's target ratios, writes JSON.

    python -m benchmarks.serve_bench [--allocator tcmalloc] [--model PATH] [--env KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.loadgen import closed_loop, make_png_bodies
from benchmarks.model_speed import ALLOCATORS, find_library

ROOT = Path(__file__).resolve().parents[1]


def raw_ceiling(model_path, bodies, seconds: float = 5.0) -> dict:
    import model

    seg = model.load(model_path, device="auto")
    images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in bodies]
    per_batch = {}
    for batch in (1, 2, 4, 8):
        chunk = (images * 8)[:batch]
        seg.predict(chunk)
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 3:
            t = time.perf_counter()
            seg.predict(chunk)
            times.append(time.perf_counter() - t)
        per_batch[batch] = {
            "images_per_s": batch / statistics.median(times),
            "ms": statistics.median(times) * 1000,
        }
        print(f"  raw predict batch {batch}: {per_batch[batch]['images_per_s']:.2f} img/s", flush=True)
    best = max(per_batch, key=lambda b: per_batch[b]["images_per_s"])
    return {
        "device": str(seg.device),
        "per_batch": per_batch,
        "best_batch": best,
        "images_per_s": per_batch[best]["images_per_s"],
        "predict_batch1_ms": per_batch[1]["ms"],
    }


def start_server(model_path, env_extra: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, CHANSEG_HOST="127.0.0.1", CHANSEG_PORT=str(port), CHANSEG_LOG_LEVEL="warning")
    if model_path:
        env["CHANSEG_MODEL_PATH"] = str(model_path)
    env.update(env_extra)
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
    proc.kill()
    raise TimeoutError("server not ready in 180 s")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="artifact (default: the bundled model)")
    parser.add_argument("--allocator", choices=list(ALLOCATORS), default="tcmalloc")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--env", nargs="*", default=[], help="extra CHANSEG_* settings, KEY=VALUE")
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    args = parser.parse_args()

    lib = find_library(ALLOCATORS[args.allocator]) if ALLOCATORS[args.allocator] else None
    if lib and lib not in os.environ.get("LD_PRELOAD", ""):
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.serve_bench", *sys.argv[1:]],
                  dict(os.environ, LD_PRELOAD=lib))  # fmt: skip
    if ALLOCATORS[args.allocator] and not lib:
        print(f"{args.allocator} is not installed; running with glibc malloc")

    bodies = make_png_bodies(16, 256)
    print("[raw ceiling]", flush=True)
    ceiling = raw_ceiling(args.model, bodies)
    env = dict(kv.split("=", 1) for kv in args.env)
    proc, url = start_server(args.model, env)
    try:
        meta = httpx.get(url + "/v1/model").json()
        runs = []
        for c in args.concurrency:
            print(f"[service, concurrency {c}]", flush=True)
            r = asyncio.run(closed_loop(url, bodies, c, args.duration, args.warmup))
            runs.append(r.summary())
    finally:
        proc.terminate()
        proc.wait(60)

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "allocator": args.allocator if lib or not ALLOCATORS[args.allocator] else "glibc",
        "ceiling": ceiling,
        "server": {"batching": meta["batching"], "device": meta["device"], "settings": env},
        "runs": runs,
    }
    print_report(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {args.out}")
    return 0


def print_report(report: dict) -> None:
    c = report["ceiling"]
    print(f"\nmachine: {report['machine']}; allocator: {report['allocator']}")
    print(
        f"raw ceiling: {c['images_per_s']:.2f} img/s (batch {c['best_batch']}); predict batch 1: {c['predict_batch1_ms']:.1f} ms"
    )
    print(f"server batching: {report['server']['batching']}")
    print("| concurrency | img/s | % of ceiling | p50 ms | p95 ms | p99 ms | p99/p50 | 503s | 503 p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        print(
            f"| {r['concurrency']} | {r['images_per_s']:.2f} | {100 * r['images_per_s'] / c['images_per_s']:.0f}% "
            f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['p99_ms'] / r['p50_ms']:.2f} "
            f"| {r['statuses'].get('503', 0)} | {r['rejected_p99_ms']:.0f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
