"""Memory: a real server under a hostile but legal mix stays inside its pod's limit.

``python -m service`` with its default limits (the bundled model, tcmalloc when
installed, as deployed) receives, all at once: multipart requests of 16 flat
6000x6000 PNGs (36 Mpx each, a few hundred kB on the wire), one of 16-bit grey
PNGs, v2 requests asking for ``PROBABILITIES`` and a JSON ``MASK`` of such an
image, a binary v2 ``IMAGE`` near the body limit, an EXIF-rotated 6000x6000
JPEG, RGBA, palette, CMYK, TIFF, WebP and GIF images of the same size, and a
8x100000 strip. The process's peak RSS (``VmHWM``) must stay under 80% of the
memory limit in ``deploy/k8s/base/deployment.yaml`` (16 images per multipart
request with ``CHANSEG_RELIABILITY=long``, as the issue had it; 8 in ``make test-all``), and grow by no more than
``MEMORY_BUDGET_MB`` (+25% for the allocator's slack) over what it held before; every answer is a 200 or
a documented 4xx (an output over the limit), never a 5xx; a 503 (queue full)
is retried after its ``Retry-After``, as a polite client does.

``pytest -s tests/reliability/test_memory.py`` prints the figures.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.reliability.conftest import LONG, report, start_server

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SIDE = 6000
PER_REQUEST = 16 if LONG else 8
# tcmalloc when installed, as deployed; CHANSEG_TEST_GLIBC=1 measures glibc's malloc instead.
ALLOCATOR_ENV = {"LD_PRELOAD": ""} if os.environ.get("CHANSEG_TEST_GLIBC") else {}
ALLOCATOR_ENV.update({k: v for k, v in os.environ.items() if k.startswith("MALLOC_")})


def pod_memory_limit() -> int:
    """The container memory limit of the Kubernetes Deployment, in bytes."""
    deployment = yaml.safe_load((ROOT / "deploy/k8s/base/deployment.yaml").read_text())
    limit = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", limit).groups()
    return int(number) * {"Mi": 2**20, "Gi": 2**30}[unit]


def encode(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def big_images() -> dict:
    """Flat 6000x6000 images: tiny files, huge decodes."""
    size = (SIDE, SIDE)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees on display
    palette = Image.new("P", size, 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    return {
        "png": encode(Image.new("RGB", size, (200, 30, 30)), "PNG"),
        "png16": encode(Image.new("I;16", size, 40000), "PNG"),
        "jpeg_rotated": encode(Image.new("RGB", size, (30, 200, 30)), "JPEG", quality=90, exif=exif),
        "rgba": encode(Image.new("RGBA", size, (30, 30, 200, 128)), "PNG"),
        "palette": encode(palette, "PNG", transparency=0),
        "cmyk": encode(Image.new("CMYK", size, (0, 200, 200, 0)), "JPEG", quality=90),
        "tiff": encode(Image.new("RGB", size, (90, 90, 90)), "TIFF", compression="tiff_adobe_deflate"),
        "webp": encode(Image.new("RGB", size, (10, 120, 10)), "WEBP", lossless=True),
        "gif": encode(Image.new("P", size, 3), "GIF"),
        "strip": encode(Image.new("RGB", (100_000, 8), (200, 30, 30)), "PNG"),
    }


def multipart_files(blob: bytes, count: int, ext: str = "png") -> list:
    return [("file", (f"{i}.{ext}", blob, "application/octet-stream")) for i in range(count)]


def v2_bytes(blob: bytes, output: str, binary: bool) -> tuple[bytes, dict]:
    """An IMAGE_BYTES request with the encoded file in the binary extension."""
    element = struct.pack("<I", len(blob)) + blob
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "IMAGE_BYTES",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(element)},
                }
            ],
            "outputs": [{"name": output, "parameters": {"binary_data": binary}}],
        }
    ).encode()
    return header + element, {"Inference-Header-Content-Length": str(len(header))}


def v2_uint8(height: int, width: int) -> tuple[bytes, dict]:
    """A binary IMAGE request of one (height, width, 3) image."""
    pixels = np.full((1, height, width, 3), 77, dtype=np.uint8).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "IMAGE",
                    "datatype": "UINT8",
                    "shape": [1, height, width, 3],
                    "parameters": {"binary_data_size": len(pixels)},
                }
            ],
            "outputs": [{"name": "MASK", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + pixels, {"Inference-Header-Content-Length": str(len(header))}


def v2_json_image(height: int, width: int) -> bytes:
    data = np.full(height * width * 3, 7, dtype=np.uint8).tolist()
    return json.dumps(
        {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, height, width, 3], "data": data}]}
    ).encode()


class PeakSampler:
    """Samples the process's RSS and the budget's reserved bytes (from /metrics);
    ``VmHWM`` is the kernel's own peak of RSS."""

    def __init__(self, pid: int, url: str = "") -> None:
        self.status = Path(f"/proc/{pid}/status")
        self.url = url
        self.samples: list[tuple[float, int]] = []
        self.reserved = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self, field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+)", self.status.read_text()).group(1)) * 1024

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - started, self.read("VmRSS")))
            except (OSError, AttributeError):
                return
            if self.url:
                try:
                    text = httpx.get(self.url + "/metrics", timeout=2).text
                    now = sum(
                        float(line.split()[-1])
                        for line in text.splitlines()
                        if line.startswith("chanseg_memory_reserved_bytes{")
                    )
                    self.reserved = max(self.reserved, int(now))
                except httpx.HTTPError:
                    pass
            time.sleep(0.02)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_hostile_mix_stays_inside_the_pod_memory_limit(tmp_path):
    limit = pod_memory_limit()
    images = big_images()
    # A long deadline: the mix is minutes of work on 2 cores, and this test is about memory.
    server = start_server(
        tmp_path, CHANSEG_MAX_BATCH_SIZE="4", CHANSEG_REQUEST_TIMEOUT_S="600", **ALLOCATOR_ENV
    )
    url = server.url
    requests = {
        # the mix (16 images per request in the long form; 8 in `make test-all`,
        # which still holds several times the work ledger's worth of decoding)
        "png (1)": dict(files=multipart_files(images["png"], PER_REQUEST)),
        "png (2)": dict(files=multipart_files(images["png"], PER_REQUEST)),
        "png (3)": dict(files=multipart_files(images["png"], PER_REQUEST)),
        "png16": dict(files=multipart_files(images["png16"], PER_REQUEST)),
        "v2 probabilities": dict(
            path="/v2/models/chanseg/infer", body=v2_bytes(images["png"], "PROBABILITIES", True)
        ),
        "v2 json mask": dict(path="/v2/models/chanseg/infer", body=v2_bytes(images["png"], "MASK", False)),
        # and more of our own
        "jpeg rotated": dict(path="/predict?format=png", raw=(images["jpeg_rotated"], "image/jpeg")),
        "modes": dict(
            files=[
                ("file", (f"{name}.img", images[name], "application/octet-stream"))
                for name in ("rgba", "palette", "cmyk", "tiff", "webp", "gif", "strip")
            ]
        ),
        "v2 uint8 binary": dict(path="/v2/models/chanseg/infer", body=v2_uint8(3000, 3500)),
        "v2 bytes mask binary": dict(
            path="/v2/models/chanseg/infer", body=v2_bytes(images["png"], "MASK", True)
        ),
        "v2 json image": dict(path="/v2/models/chanseg/infer", body=(v2_json_image(700, 700), {})),
    }

    def send(name: str, spec: dict) -> tuple[str, int, str]:
        """A polite client: on 503 it waits for Retry-After and tries again."""
        path = spec.get("path", "/predict")
        with httpx.Client(base_url=url, timeout=300) as client:
            for _ in range(100):
                if "files" in spec:
                    r = client.post(path, files=spec["files"])
                elif "raw" in spec:
                    r = client.post(path, content=spec["raw"][0], headers={"content-type": spec["raw"][1]})
                else:
                    body, headers = spec["body"]
                    r = client.post(
                        path, content=body, headers={"content-type": "application/json", **headers}
                    )
                if r.status_code != 503:
                    break
                time.sleep(float(r.headers["retry-after"]))
        detail = "" if r.status_code == 200 else r.text[:300]
        return name, r.status_code, detail

    try:
        baseline = PeakSampler(server.proc.pid).read("VmRSS")
        started = time.monotonic()
        with PeakSampler(server.proc.pid, url) as sampler, ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(lambda item: send(*item), requests.items()))
            peak = sampler.read("VmHWM")
        elapsed = time.monotonic() - started
        # the server is still healthy and serving afterwards
        small = base64.b64decode(base64.b64encode(encode(Image.new("RGB", (64, 64), 9), "PNG")))
        after = httpx.post(url + "/predict", content=small, headers={"content-type": "image/png"}, timeout=60)
        log = server.log.read_text()
    finally:
        server.stop()
    statuses = {name: status for name, status, _ in results}
    report(
        "hostile memory mix",
        baseline_mib=baseline / 2**20,
        peak_rss_mib=peak / 2**20,
        peak_reserved_mib=sampler.reserved / 2**20,
        limit_mib=limit / 2**20,
        seconds=elapsed,
        statuses=statuses,
    )
    for name, status, detail in results:
        if status != 200:
            print(f"  {name}: {status} {detail}")
    assert after.status_code == 200, log[-3000:]
    assert all(status == 200 or 400 <= status < 500 for status in statuses.values()), (statuses, log[-3000:])
    # the image requests are served, by waiting for room rather than by refusal
    for name in ("png (1)", "png (2)", "png (3)", "png16", "jpeg rotated", "modes"):
        assert statuses[name] == 200, (name, results, log[-3000:])
    assert peak < 0.8 * limit, (
        f"peak RSS {peak / 2**20:.0f} MiB over 80% of the pod's {limit / 2**20:.0f} MiB"
    )
    # the budget is honest: the process grew by what it reserved, plus the allocator's
    # slack (freed pages not yet handed back: up to ~20% seen here with tcmalloc)
    budget = 1024 * 2**20  # MEMORY_BUDGET_MB's default
    assert peak - baseline < 1.25 * budget, (peak - baseline) / 2**20
