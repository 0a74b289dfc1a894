"""chanseg alone against chanseg on Ray Serve, on one machine, in one run.

``python -m benchmarks.ray_serve [--concurrency 1 4 16] [--window 4] [--max-batch-size 8]``

Three servers up together, the same model and batch size, the same 256x256 PNG
posted as multipart, the mask PNG back (``/predict?format=png``):

- ``alone``: ``python -m service``;
- ``ray``: the Serve application ``service.ray_serve:build`` makes (one replica with
  all the CPUs, chanseg's own batcher inside), through Ray's HTTP proxy;
- ``ray-batch``: one replica of a plain Serve deployment that batches with
  ``@serve.batch`` instead (FastAPI ingress; decode and resize on a thread pool, the
  batched forward on one inference thread, the mask PNG encoded on the pool): the
  other batcher the Ray application could have used.

At each concurrency the three take turns (the machine's drift falls on all of
them); Ray's own processes run throughout, so their idle cost falls on ``alone`` too
and is printed separately (CPU seconds per second while nothing is asked).
Prints images/s, p50/p99 and each Ray variant's throughput relative to ``alone``.
"""

# No `from __future__ import annotations`: the deployment class is pickled by value to the
# replica, where FastAPI could not resolve string annotations against this module.
import argparse
import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import httpx
import torch
from fastapi import FastAPI, File, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

import model
from benchmarks.client import multipart
from benchmarks.loadgen import measure
from model.visualize import mask_png_bytes
from service.imaging import prepare_probed, probe_image
from service.settings import Settings
from testbed.allocators import ALLOCATORS, find_library
from testbed.images import make_images
from testbed.processes import ServiceProcess, free_port


def batched_application(settings: Dict[str, object], num_cpus: int, max_batch_size: int, runtime_env: dict):
    """A Serve deployment that batches with ``@serve.batch``: what a user writes from
    Ray's documentation, with chanseg's model and image functions."""
    from ray import serve

    api = FastAPI()

    @serve.deployment(
        name="batched",
        ray_actor_options={"num_cpus": num_cpus, "runtime_env": runtime_env},
        max_ongoing_requests=4 * max_batch_size,
    )
    @serve.ingress(api)
    class Batched:
        def __init__(self) -> None:
            s = Settings(**settings)
            torch.set_num_threads(num_cpus)
            self.inference = ThreadPoolExecutor(1)  # torch work on one thread, as chanseg does
            self.segmenter = self.inference.submit(
                model.load, s.model_path, "cpu", s.precision, format=s.model_format
            ).result()
            self.limits = s.max_image_pixels
            sample = torch.zeros(*self.segmenter.config.input_size, 3, dtype=torch.uint8)
            for batch in range(1, max_batch_size + 1):  # warm up every batch size
                self.inference.submit(self.segmenter.infer, [sample] * batch).result()

        def _prepare(self, data: bytes):
            probed = probe_image(data, self.limits, target=self.segmenter.config.input_size)
            size = (probed.height, probed.width)
            return torch.from_numpy(prepare_probed(probed, self.segmenter.config.input_size)), size

        def _encode(self, labels, size) -> bytes:
            return mask_png_bytes(self.segmenter.restore(labels, size), self.segmenter.config.num_classes)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0.005)
        async def forward(self, tensors: List) -> List:
            loop = asyncio.get_running_loop()
            labels = await loop.run_in_executor(self.inference, self.segmenter.infer, tensors)
            return list(labels)

        @api.post("/predict")
        async def predict(self, file: UploadFile = File(...)) -> Response:
            tensor, size = await run_in_threadpool(self._prepare, await file.read())
            labels = await self.forward(tensor)
            return Response(await run_in_threadpool(self._encode, labels, size), media_type="image/png")

    return Batched.bind()


def _ray_cpu_seconds() -> float:
    """CPU seconds used so far by Ray's own processes (GCS, raylet, dashboard, agents)."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
            if b"ray" not in cmd or b"ServeReplica" in cmd:
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return total


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--window", type=float, default=4.0)
    parser.add_argument("--max-windows", type=int, default=5)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--model", help="artifact (default: the bundled model, as the server loads it)")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from service.ray_serve import build

    cpus = len(os.sched_getaffinity(0))
    tcmalloc = find_library(ALLOCATORS["tcmalloc"])
    preload = {"LD_PRELOAD": tcmalloc} if tcmalloc else {}
    settings: Dict[str, object] = {
        "device": "cpu",
        "max_batch_size": args.max_batch_size,
        "log_level": "warning",
    }
    if args.model:
        settings["model_path"] = args.model
    alone = ServiceProcess({f"CHANSEG_{k.upper()}": str(v) for k, v in settings.items()} | preload)
    # Two replicas of `cpus` logical CPUs each on one node: Ray counts, the OS shares the cores.
    ray.init(num_cpus=2 * cpus, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        runtime_env = {"env_vars": preload}
        serve.run(
            build({**settings, "num_cpus": cpus, "runtime_env": runtime_env}),
            name="chanseg",
            route_prefix="/chanseg",
        )
        serve.run(
            batched_application(settings, cpus, args.max_batch_size, runtime_env),
            name="batched",
            route_prefix="/batched",
        )
        alone.wait_ready(600)
        image = make_images(1, 256, "PNG")[0]
        ray_url = f"http://127.0.0.1:{port}"
        targets = {
            "alone": (alone.url, "/predict?format=png"),
            "ray": (ray_url, "/chanseg/predict?format=png"),
            "ray-batch": (ray_url, "/batched/predict"),
        }
        for name, (url, path) in targets.items():  # each answers before anything is measured
            response = httpx.post(url + path, files={"file": ("i.png", image, "image/png")}, timeout=120)
            assert response.status_code == 200 and response.content[:4] == b"\x89PNG", (
                name,
                response.text[:200],
            )
        idle_from, idle_t = _ray_cpu_seconds(), time.monotonic()
        time.sleep(10)
        idle = (_ray_cpu_seconds() - idle_from) / (time.monotonic() - idle_t)
        print(
            f"{cpus} CPUs; batches of up to {args.max_batch_size}; one 256x256 PNG; closed loop; "
            f"allocator {'tcmalloc' if tcmalloc else 'glibc'}; Ray's own processes idle: {idle:.3f} CPU-s/s"
        )
        print(
            f"{'server':<10} {'c':>3} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs alone':>9} {'status':>9}"
        )
        common = dict(window_s=args.window, warmup_s=1.0, max_windows=args.max_windows)
        for c in args.concurrency:
            results = {}
            for name, (url, path) in targets.items():
                m = asyncio.run(measure(url, [multipart(image)], concurrency=c, path=path, **common))
                results[name] = m
                ratio = m.images_per_s / results["alone"].images_per_s
                print(
                    f"{name:<10} {c:>3} {m.images_per_s:>8.1f} {m.p50_ms:>8.1f} {m.p99_ms:>8.1f} {ratio:>9.2f} "
                    f"{m.status:>9}" + ("" if m.ok == m.requests else f"  ({m.requests - m.ok} not 200)"),
                    flush=True,
                )
    finally:
        alone.stop(graceful=True)
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
