"""The attacks of issues 31 and 34 against a real ``python -m service``, measured: memory
and ``/healthz`` latency while hostile gRPC calls or v2 JSON bodies are in flight, and the
outcome of model loads after an unload and of a quick rollback.

    python -m benchmarks.surfaces                 # this checkout
    python -m benchmarks.surfaces --root ../old   # another checkout (before/after)

The server runs with the image's settings (the bundled model, gRPC on, an API key, a
model repository). Each scenario prints the server's peak RSS over its idle RSS,
the slowest ``/healthz`` answer seen while it ran (polled every 20 ms) and how the
calls ended:

- ``unauthenticated``: 16 gRPC ``ModelInfer`` calls of 30 MiB of raw contents, no key;
- ``empty-bytes``: 8 calls of 15 M empty ``bytes_contents``, no key;
- ``typed``: 8 keyed calls with 15 M values of ``uint_contents``;
- ``unload-load``, ``rollback``: unload then load; load B, then A, no request between;
- ``json-keys``: 4 keyed v2 bodies of 200,000 one-value ``data`` arrays (11 MB each);
- ``json-params``: 4 keyed bodies of 16 M numbers under ``parameters`` (32 MB each);
- ``json-1024``: 8 keyed 1024x1024 RGB images as nested JSON (``image.tolist()``, 13 MB);
- ``deflate-bomb``: 8 keyed 40 KB deflate bodies that inflate to 40 MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional

import httpx

from testbed.processes import ROOT, ServiceProcess

KEY = "surfaces-key"
MIB = 1 << 20


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Watch:
    """Samples the server's RSS and times ``/healthz`` every 20 ms while in use."""

    def __init__(self, server: ServiceProcess) -> None:
        self.server, self.peak, self.worst_ms = server, 0, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "Watch":
        self.idle = _rss(self.server.proc.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss(self.server.proc.pid))
                started = time.perf_counter()
                client.get(self.server.url + "/healthz")
                self.worst_ms = max(self.worst_ms, (time.perf_counter() - started) * 1000)
                self.peak = max(self.peak, _rss(self.server.proc.pid))
                time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.after = _rss(self.server.proc.pid)


def _grpc_calls(url: str, requests: List[bytes], metadata: tuple) -> Dict[str, int]:
    """Each request (a serialized ModelInferRequest) sent at once on its own channel."""
    import grpc

    def one(message: bytes) -> str:
        with grpc.insecure_channel(
            url,
            options=[
                ("grpc.max_send_message_length", 64 * MIB),
                ("grpc.max_receive_message_length", 64 * MIB),
            ],
        ) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            try:
                call(message, metadata=metadata, timeout=120)
                return "OK"
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()[:80]}"

    outcomes: Dict[str, int] = {}
    with ThreadPoolExecutor(len(requests)) as pool:
        for outcome in pool.map(one, requests):
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def _messages() -> Dict[str, Callable[[], tuple]]:
    from tritonclient.grpc import service_pb2 as pb

    def raw30() -> tuple:
        r = pb.ModelInferRequest(model_name="chanseg")
        r.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 2000, 5000, 3])
        r.raw_input_contents.append(b"\0" * (30 * MIB))
        return [r.SerializeToString()] * 16, ()

    def empty_bytes() -> tuple:
        r = pb.ModelInferRequest(model_name="chanseg")
        r.inputs.add(name="IMAGE_BYTES", datatype="BYTES", shape=[1]).contents.bytes_contents.extend(
            [b""] * 15_000_000
        )
        return [r.SerializeToString()] * 8, ()

    def typed() -> tuple:
        r = pb.ModelInferRequest(model_name="chanseg")
        t = r.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 2500, 2000, 3])
        t.contents.uint_contents.extend([7] * 15_000_000)
        return [r.SerializeToString()] * 8, (("authorization", f"Bearer {KEY}"),)

    return {"unauthenticated": raw30, "empty-bytes": empty_bytes, "typed": typed}


def _http_posts(url: str, requests: List[tuple]) -> Dict[str, int]:
    """Each (body, headers) POSTed to the model's v2 infer at once: the outcomes counted."""

    def one(request: tuple) -> str:
        body, headers = request
        r = httpx.post(url + "/v2/models/chanseg/infer", content=body, headers=headers, timeout=120)
        return str(r.status_code) if r.status_code == 200 else f"{r.status_code}: {r.json()['error'][:60]}"

    outcomes: Dict[str, int] = {}
    with ThreadPoolExecutor(len(requests)) as pool:
        for outcome in pool.map(one, requests):
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def _bodies() -> Dict[str, Callable[[], List[tuple]]]:
    import zlib

    import numpy as np

    auth = {"authorization": f"Bearer {KEY}"}

    def keys() -> List[tuple]:
        item = b'{"name":"IMAGE","datatype":"UINT8","shape":[1],"data":[1]}'
        return [(b'{"inputs":[' + b",".join([item] * 200_000) + b"]}", auth)] * 4

    def params() -> List[tuple]:
        return [(b'{"inputs":[],"parameters":{"x":[' + b"1," * 15_999_999 + b"1]}}", auth)] * 4

    def image1024() -> List[tuple]:
        pixels = np.random.default_rng(0).integers(0, 256, (1, 1024, 1024, 3))
        doc = {
            "inputs": [
                {"name": "IMAGE", "datatype": "UINT8", "shape": [1, 1024, 1024, 3], "data": pixels.tolist()}
            ]
        }
        return [(json.dumps(doc, separators=(",", ":")).encode(), auth)] * 8

    def bomb() -> List[tuple]:
        return [(zlib.compress(b" " * (40 * MIB), 9), {**auth, "content-encoding": "deflate"})] * 8

    return {"json-keys": keys, "json-params": params, "json-1024": image1024, "deflate-bomb": bomb}


def _repository_outcomes(server: ServiceProcess) -> Dict[str, str]:
    """A request, unload, then load; then load B, load A with no request between: status codes and times."""
    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    out: Dict[str, str] = {}
    with httpx.Client(base_url=server.url, headers=auth, timeout=120) as client:

        def call(path: str, body: Optional[dict] = None) -> str:
            started = time.perf_counter()
            r = client.post(path, content=json.dumps(body or {}))
            return f"{r.status_code} in {time.perf_counter() - started:.1f} s"

        def load(name: str) -> str:
            return call("/v2/repository/models/chanseg/load", {"parameters": {"path": name}})

        image = {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 8, 8, 3], "data": [0] * 192}]}
        out["infer"] = str(client.post("/v2/models/chanseg/infer", content=json.dumps(image)).status_code)
        out["unload"] = call("/v2/repository/models/chanseg/unload")
        out["load after unload"] = load("a.pt")
        out["readyz after"] = str(client.get("/readyz").status_code)
        out["load B"] = load("b.pt")
        out["load A right after"] = load("a.pt")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose server is measured")
    parser.add_argument("--only", nargs="+", help="scenarios to run (default: all)")
    args = parser.parse_args(argv)
    from safetensors.torch import load_file

    import model
    from model.export import build_network
    from model.pretrained import default_config, default_weights

    with tempfile.TemporaryDirectory(prefix="chanseg-surfaces-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        config = default_config()
        net = build_network(config, load_file(str(default_weights())))
        for name, version in (("a.pt", "a"), ("b.pt", "b")):
            model.export_torchscript(net, repo / name, config, version=version)
        del net
        scenarios = [*_messages(), *_bodies(), "repository"]
        for name in [s for s in scenarios if not args.only or s in args.only]:
            env = {
                "CHANSEG_DEVICE": "cpu", "CHANSEG_API_KEY": KEY,
                "CHANSEG_MODEL_REPOSITORY": str(repo), "CHANSEG_MODEL_PATH": str(repo / "a.pt"),
                "CHANSEG_MAX_BATCH_SIZE": "4", "CHANSEG_LOG_LEVEL": "warning", "TMPDIR": tmp,
            }  # fmt: skip
            log = Path(tmp) / f"server-{name}.log"
            server = ServiceProcess(env, log=log, root=args.root, grpc=True)  # a fresh server per scenario
            try:
                server.wait_ready(240)
                if name == "repository":
                    for what, outcome in _repository_outcomes(server).items():
                        print(f"{what:24s} {outcome}", flush=True)
                    continue
                if name in _bodies():
                    requests = _bodies()[name]()
                    with Watch(server) as watch:
                        outcomes = _http_posts(server.url, requests)
                        time.sleep(0.5)
                else:
                    requests, metadata = _messages()[name]()
                    with Watch(server) as watch:
                        outcomes = _grpc_calls(server.grpc_url, requests, metadata)
                        time.sleep(0.5)
                print(
                    f"{name:16s} idle {watch.idle / MIB:5.0f} MiB, peak +{(watch.peak - watch.idle) / MIB:5.0f} MiB, "
                    f"after +{(watch.after - watch.idle) / MIB:5.0f} MiB; /healthz worst {watch.worst_ms:6.0f} ms; "
                    f"{outcomes}",
                    flush=True,
                )
            finally:
                server.stop()
                with contextlib.suppress(OSError):
                    shutil.copy(log, Path(tempfile.gettempdir()) / f"chanseg-surfaces-{name}.log")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
