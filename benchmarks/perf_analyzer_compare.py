"""Two load generators on one server: the harness's own (``benchmarks.loadgen``) and
Triton's perf_analyzer (``testbed.perf_analyzer``), each sending the same request (one
256x256 image as the v2 ``IMAGE`` input in binary, ``MASK`` back in binary) at
concurrency 1 and 4, over HTTP and gRPC, taking turns on one chanseg server. Prints
each one's throughput and median latency and their ratio: do they agree?

``python -m benchmarks.perf_analyzer_compare [--window 5] [--model-path FILE]``
(the bundled model by default; needs ``python -m testbed.perf_analyzer install``)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.client import GrpcClient, v2_binary
from benchmarks.loadgen import measure
from testbed import perf_analyzer
from testbed.images import IMAGE_SETS
from testbed.processes import ServiceProcess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=5.0, help="seconds per measurement window")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--model-path", default="", help="a model file (default: the bundled model)")
    args = parser.parse_args()
    if perf_analyzer.binary() is None:
        raise SystemExit("perf_analyzer is not installed: python -m testbed.perf_analyzer install")
    png = IMAGE_SETS["png256"]()[0]
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    env = {"CHANSEG_DEVICE": "cpu", "CHANSEG_LOG_LEVEL": "warning"}
    if args.model_path:
        env["CHANSEG_MODEL_PATH"] = args.model_path
    server = ServiceProcess(env, grpc=True)
    rows = []
    try:
        server.wait_ready(300)
        name = httpx.get(server.url + "/v1/model").json()["name"]
        with tempfile.TemporaryDirectory() as tmp:
            data = perf_analyzer.input_data(Path(tmp) / "input.json", pixels)
            for protocol in ("http", "grpc"):
                for concurrency in args.concurrency:
                    ours = asyncio.run(
                        _harness(server.url, server.grpc_url, name, png, protocol, concurrency, args.window)
                    )
                    target = server.grpc_url if protocol == "grpc" else server.url.removeprefix("http://")
                    theirs = perf_analyzer.run(
                        target, name, data, concurrency, protocol, window_ms=int(args.window * 1000)
                    )
                    rows.append((protocol, concurrency, ours, theirs))
    finally:
        server.stop(graceful=True)
    print(f"chanseg '{name}' on the CPU; one 256x256 image per request, IMAGE and MASK in binary")
    print(
        f"{'protocol':>8} {'conc':>4} | {'harness img/s':>13} {'p50 ms':>7} | {'perf_analyzer inf/s':>19} {'p50 ms':>7} | {'img/s ratio':>11} {'p50 ratio':>9}"
    )
    for protocol, concurrency, ours, theirs in rows:
        pa_rate, pa_p50 = theirs["Inferences/Second"], theirs["p50 latency"] / 1000
        print(
            f"{protocol:>8} {concurrency:>4} | {ours.images_per_s:13.2f} {ours.p50_ms:7.1f} | {pa_rate:19.2f} {pa_p50:7.1f} | "
            f"{pa_rate / ours.images_per_s:11.2f} {pa_p50 / ours.p50_ms:9.2f}"
        )


async def _harness(
    url: str, grpc_url: str, name: str, png: bytes, protocol: str, concurrency: int, window: float
):
    payload = v2_binary(png)
    client = GrpcClient(grpc_url, name, 60.0) if protocol == "grpc" else None
    return await measure(
        url,
        [payload],
        concurrency=concurrency,
        path=f"/v2/models/{name}/infer",
        window_s=window,
        client=client,
    )


if __name__ == "__main__":
    main()
