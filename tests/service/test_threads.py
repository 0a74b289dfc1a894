"""All torch work in the server runs on one thread.

libgomp keeps one OpenMP thread team per thread that ever ran a parallel
kernel; with more team threads than cores it stops spinning between parallel
regions, and every forward pass in the process got ~25% slower here (42 -> 52
ms per image with one extra team). So the server loads, warms up and infers on
its inference thread only, and the stages on the I/O pool (decode, resize,
mask upsampling, softmax, PNG) use PIL and numpy. This test serves every kind
of request (resizing JPEGs, probabilities, v2) and counts the OpenMP worker
threads: one team's worth, no more.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
        async with serve(make_settings(artifact, max_batch_size=4, num_threads=2)) as client:
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
        print(json.dumps({"before": before, "during": during, "threads": torch.get_num_threads()}))

    asyncio.run(main(os.environ["ARTIFACT"]))
    """
)


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
