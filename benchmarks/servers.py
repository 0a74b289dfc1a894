"""The scenarios' processes: the raw ceiling and the servers under test.

Every process gets the same allocator (``LD_PRELOAD``) and listens on a free
loopback port; ``running`` starts one, waits until it is ready and answers a
real request, and always stops it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import httpx

from benchmarks.client import Payload, base64_json, multipart
from testbed.processes import ROOT, ServiceProcess, child_env, free_port, stop_group

__all__ = ["Scenario", "SCENARIOS", "running", "raw_ceiling"]


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # chanseg | naive | litserve
    env: Dict[str, str]
    label: str

    def payload(self, image: bytes) -> Payload:
        return base64_json(image) if self.kind == "litserve" else multipart(image)

    @property
    def path(self) -> str:
        return "/predict" if self.kind == "litserve" else "/predict?format=png"


SCENARIOS = {
    "chanseg": Scenario("chanseg", "chanseg", {}, "chanseg, default batching"),
    "chanseg-b1": Scenario(
        "chanseg-b1", "chanseg", {"CHANSEG_MAX_BATCH_SIZE": "1"}, "chanseg, MAX_BATCH_SIZE=1"
    ),
    "naive": Scenario("naive", "naive", {}, "naive FastAPI (model in the handler)"),
    "litserve": Scenario("litserve", "litserve", {}, "LitServe, its own batching"),
}


def _command(scenario: Scenario, port: int, model_path: Optional[str], litserve_batch: int) -> List[str]:
    model_args = ["--model", model_path] if model_path else []
    if scenario.kind == "naive":
        return [sys.executable, "-m", "benchmarks.naive_server", "--port", str(port), *model_args]
    if scenario.kind == "litserve":
        return [
            sys.executable, "-m", "benchmarks.litserve_server", "--port", str(port),
            "--max-batch-size", str(litserve_batch), "--accelerator", "cpu", *model_args,
        ]  # fmt: skip
    raise ValueError(scenario.kind)


@contextlib.contextmanager
def running(
    scenario: Scenario,
    sample: bytes,
    model_path: Optional[str] = None,
    preload: Optional[str] = None,
    litserve_batch: int = 1,
    log_path: Optional[Path] = None,
    ready_timeout_s: float = 240.0,
    facts: Optional[Dict[str, float]] = None,
) -> Iterator[str]:
    """Start the scenario's server; yield its URL once ``sample`` gets a 200.
    ``facts`` (when given) gets ``startup_s``, from the process's start to that 200,
    and ``pgid``, the server's process group (all its processes: ``benchmarks.cpu``)."""
    port = free_port()
    extra = dict(scenario.env)
    with contextlib.ExitStack() as stack:
        # A temporary directory of its own, removed once it has stopped: torch's package
        # loader (the naive server's) extracts 9.6 MiB there and leaves it behind.
        extra["TMPDIR"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="chanseg-bench-"))
        started = time.monotonic()
        if scenario.kind == "chanseg":
            extra.update(CHANSEG_LOG_LEVEL="warning", **({"LD_PRELOAD": preload} if preload else {}))
            if model_path:
                extra["CHANSEG_MODEL_PATH"] = str(model_path)
            proc = ServiceProcess(extra, log_path, port).proc
        else:
            log = stack.enter_context(open(log_path, "wb")) if log_path else subprocess.DEVNULL
            proc = subprocess.Popen(
                _command(scenario, port, model_path, litserve_batch),
                env=child_env(preload, extra),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # LitServe's worker processes go with it
            )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(proc, url, scenario, sample, ready_timeout_s)
            if facts is not None:
                facts["startup_s"] = round(time.monotonic() - started, 2)
                facts["pgid"] = proc.pid  # a session of its own: the group is the server's
            yield url
        finally:
            stop_group(proc)


def _wait_ready(proc, url: str, scenario: Scenario, sample: bytes, timeout_s: float) -> None:
    payload = scenario.payload(sample)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{scenario.name}: server exited with {proc.returncode} during start-up")
        try:
            r = httpx.post(
                url + scenario.path,
                content=payload.body,
                headers={"content-type": payload.content_type},
                timeout=30,
            )
            if r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n":
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{scenario.name}: not serving after {timeout_s:.0f} s")


def raw_ceiling(
    images: List[bytes],
    model_path: Optional[str],
    preload: Optional[str],
    seconds: float = 4.0,
    device: str = "auto",
    precision: str = "fp32",
    format: str = "auto",
    batches: Optional[List[int]] = None,
) -> dict:
    """``Segmenter.predict`` on decoded images per batch size (``batches``: the
    ceiling's default, 1 2 4 8, when None), in a fresh process with the same
    allocator; no HTTP. See ``benchmarks.ceiling``."""
    cmd = [sys.executable, "-m", "benchmarks.ceiling", "--seconds", str(seconds)]
    if batches:
        cmd += ["--batches", *map(str, batches)]
    cmd += ["--device", device, "--precision", precision, "--format", format]
    if model_path:
        cmd += ["--model", str(model_path)]
    out = subprocess.run(
        cmd,
        input=json.dumps([img.hex() for img in images]),
        env=child_env(preload, {}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"raw ceiling failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)
