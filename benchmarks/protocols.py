"""HTTP against gRPC on one server in one run: the same 256x256 image sent three ways,
each answered with its mask.

``python -m benchmarks.protocols [--concurrency 1 4 16] [--window 3] [--model PATH]``

- ``predict``: ``POST /predict?format=png``, the PNG file as multipart (the server
  decodes it), the mask PNG back;
- ``v2-http``: the v2 infer endpoint, ``IMAGE`` ``UINT8 [1, 256, 256, 3]`` in the binary
  tensor data extension, ``MASK`` back in binary;
- ``v2-grpc``: the same tensor over gRPC (``GRPCInferenceService.ModelInfer``, raw
  contents), ``MASK`` back raw.

One chanseg server (``GRPC_PORT`` set, tcmalloc when installed), the load generator's
closed loop at each concurrency, the protocols taking turns at each level so that the
machine's drift falls on all of them. Prints images/s, p50/p99 and the client's CPU per
request (the client shares the machine).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import List, Optional

from benchmarks.client import GrpcClient, multipart, v2_binary
from benchmarks.loadgen import measure
from testbed.allocators import ALLOCATORS, find_library
from testbed.images import make_images
from testbed.processes import ServiceProcess


async def _one(
    url: str, grpc_target: str, model_name: str, protocol: str, concurrency: int, image: bytes, args
):
    common = dict(concurrency=concurrency, window_s=args.window, warmup_s=1.0, max_windows=args.max_windows)
    if protocol == "predict":
        return await measure(url, [multipart(image)], path="/predict?format=png", **common)
    if protocol == "v2-http":
        return await measure(url, [v2_binary(image)], path=f"/v2/models/{model_name}/infer", **common)
    client = GrpcClient(grpc_target, model_name, timeout_s=60)
    try:
        return await measure(url, [v2_binary(image)], client=client, **common)
    finally:
        await client.aclose()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--window", type=float, default=3.0)
    parser.add_argument("--max-windows", type=int, default=5)
    parser.add_argument("--model", help="artifact (default: the bundled model)")
    args = parser.parse_args(argv)
    env = {"CHANSEG_DEVICE": "cpu", "CHANSEG_LOG_LEVEL": "warning"}
    if args.model:
        env["CHANSEG_MODEL_PATH"] = args.model
    tcmalloc = find_library(ALLOCATORS["tcmalloc"])
    if tcmalloc:
        env["LD_PRELOAD"] = tcmalloc
    server = ServiceProcess(env, grpc=True)
    try:
        server.wait_ready(600)
        import httpx

        model_name = httpx.get(server.url + "/v1/model").json()["name"]
        image = make_images(1, 256, "PNG")[0]
        print(
            f"model {model_name}; one 256x256 image; closed loop; allocator {'tcmalloc' if tcmalloc else 'glibc'}"
        )
        print(
            f"{'protocol':<10} {'c':>3} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'client CPU ms':>14} {'status':>9}"
        )
        for c in args.concurrency:
            for protocol in ("predict", "v2-http", "v2-grpc"):
                m = asyncio.run(_one(server.url, server.grpc_url, model_name, protocol, c, image, args))
                print(
                    f"{protocol:<10} {c:>3} {m.images_per_s:>8.1f} {m.p50_ms:>8.1f} {m.p99_ms:>8.1f} "
                    f"{m.client_cpu_ms_per_request:>14.2f} {m.status:>9}"
                    + ("" if m.ok == m.requests else f"  ({m.requests - m.ok} not 200)")
                )
    finally:
        server.stop(graceful=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
