"""All torch work in the server runs on its inference threads, with one OpenMP team.

libgomp keeps one OpenMP thread team per thread that ever ran a parallel
kernel; with more team threads than cores it stops spinning between parallel
regions, and every forward pass in the process got ~25% slower here (42 -> 52
ms per image with one extra team). So the server loads, warms up and runs every
batch that runs alone on its first inference thread; a second stream's batches
(``INFERENCE_STREAMS``, side by side while the queue stays full) run with one
thread each here, which needs no team; and the stages on the I/O pool (decode,
resize, mask upsampling, softmax, PNG) use PIL and numpy. This test serves every
kind of request (resizing JPEGs, probabilities, v2), some side by side, and
counts the OpenMP worker threads: one team's worth, no more.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import model
from tests.service.conftest import make_settings, png_bytes, random_image, serve

SCRIPT = textwrap.dedent(
    """
    import asyncio, base64, io, json, os, threading
    import numpy as np, torch
    from PIL import Image
    torch.set_num_threads(2)  # teams of 2 whatever the machine has
    from tests.service.conftest import make_settings, png_bytes, random_image, serve

    def native_only_threads():
        tasks = {int(t) for t in os.listdir("/proc/self/task")}
        return len(tasks - {t.native_id for t in threading.enumerate()})

    async def main(artifact):
        before = native_only_threads()
        async with serve(make_settings(artifact, max_batch_size=4, num_threads=2, inference_streams=2)) as client:
            state = client.app.state.chanseg
            big = png_bytes(random_image(1, 600, 700), "JPEG")
            small = png_bytes(random_image(2, 64, 64))
            v2 = {"inputs": [{"name": "IMAGE", "shape": [1, 20, 30, 3], "datatype": "UINT8",
                              "data": random_image(3, 20, 30).ravel().tolist()}],
                  "outputs": [{"name": "MASK"}, {"name": "PROBABILITIES"}]}
            for _ in range(2):
                answers = await asyncio.gather(
                    client.post("/predict", files=[("file", ("a.jpg", big)), ("file", ("b.png", small))]),
                    client.post("/predict", content=big,
                                headers={"content-type": "image/jpeg"}),
                    client.post("/predict?format=png", content=small, headers={"content-type": "image/png"}),
                    client.post("/v2/models/tiny/infer", json=v2),
                )
                assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
            during = native_only_threads()
            threads = state.threads
            names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
        print(json.dumps({"before": before, "during": during, "threads": threads, "names": names}))

    asyncio.run(main(os.environ["ARTIFACT"]))
    """
)


@pytest.mark.slow
def test_one_openmp_team_serves_everything(tiny_artifact, tmp_path):
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=dict(os.environ, ARTIFACT=tiny_artifact, PYTHONPATH=root),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["threads"] == 2
    # One team of 2 = the inference thread plus one OpenMP worker.
    assert counts["during"] - counts["before"] == 1, counts
    # The OS knows the threads by their names (top -H, perf, benchmarks/cpu.py), and the
    # OpenMP worker by its inference thread's: two chanseg-infer_0, one chanseg-infer-1.
    names = counts["names"]
    assert names.count("chanseg-infer_0") == 2 and names.count("chanseg-infer-1") == 1, names
    assert {"chanseg-io_0", "chanseg-io_1"} <= set(names), names


class ThreadsSeen:
    """A real Segmenter that records, per batch, its thread and torch's thread count there."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay, self.seen = inner, delay, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def logits(self, prepared):
        self.seen.append(
            (threading.current_thread().name.split("_")[0], torch.get_num_threads(), len(prepared))
        )
        time.sleep(self.delay)
        return self.inner.logits(prepared)


@pytest.mark.anyio
async def test_a_lone_batch_gets_every_thread_and_side_by_side_batches_a_share(tiny_artifact):
    seg = ThreadsSeen(model.load(tiny_artifact, device="cpu"), delay=0.2)
    settings = make_settings(tiny_artifact, max_batch_size=2, num_threads=2, inference_streams=2)

    def post(client, seed):
        return client.post(
            "/predict", content=png_bytes(random_image(seed)), headers={"content-type": "image/png"}
        )

    async with serve(settings, segmenter=seg) as client:
        seen_at_start = len(seg.seen)  # warm-up
        assert (await post(client, 1)).status_code == 200
        answers = await asyncio.gather(*(post(client, i) for i in range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        assert (await post(client, 2)).status_code == 200
        state = client.app.state.chanseg
        assert (state.threads, state.streams) == (2, 2)
    lone, *burst, last = seg.seen[seen_at_start:]
    assert lone[:2] == ("chanseg-infer", 2) and last[:2] == (
        "chanseg-infer",
        2,
    )  # all threads again after the burst
    assert {(thread, threads) for thread, threads, _ in burst} >= {
        ("chanseg-infer", 1),
        ("chanseg-infer-1", 1),
    }
    assert sum(n for *_, n in burst) == 8
