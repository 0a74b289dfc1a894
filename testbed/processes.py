"""Real processes for the tests and the benchmarks: ``python -m service`` on a loopback port
(:class:`ServiceProcess`), a free port, the environment a child gets (this one's, with
the source tree first on ``PYTHONPATH`` and an allocator preloaded or not), and stopping
a process group and everything in it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import httpx

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "ServiceProcess", "free_port", "child_env", "stop_group"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(preload: Optional[str], extra: Dict[str, str], root: Path = ROOT) -> Dict[str, str]:
    # The source tree first, then what this process was given (packages installed with
    # pip --target beside an image's own, as on the GPU machine: benchmarks/gpu_device_run.sh).
    inherited = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *([inherited] if inherited else [])]))
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    env.update(extra)
    return env


class ServiceProcess:
    """``python -m service`` on a loopback port with these settings (``CHANSEG_*`` and
    any other environment variable, over this process's environment without its
    ``LD_PRELOAD``), its output in ``log``. The benchmarks and the tests both start
    the server through this; ``wait_ready`` polls ``/readyz``.

    ``root``: the source tree it runs (another checkout: ``benchmarks.ab``); ``grpc``:
    gRPC on a free port too. Attributes: ``port``, ``url``, ``grpc_url`` (``host:port``, or
    None), ``log`` (the file, or None), ``proc`` (the Popen)."""

    def __init__(
        self,
        env: Dict[str, str],
        log: Optional[Path] = None,
        port: Optional[int] = None,
        root: Path = ROOT,
        grpc: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        settings = {"CHANSEG_HOST": "127.0.0.1", "CHANSEG_PORT": str(self.port), **env}
        self.grpc_url = None
        if grpc:
            grpc_port = free_port()
            settings["CHANSEG_GRPC_PORT"] = str(grpc_port)
            self.grpc_url = f"127.0.0.1:{grpc_port}"
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(log, "wb")) if log else subprocess.DEVNULL
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service"],
                env=child_env(None, settings, root),
                cwd=root,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log else "(no log kept)"

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.output()}")

    def stop(self, graceful: bool = False) -> None:
        """SIGKILL (tests: fast), or SIGTERM and wait for the drain (``graceful``)."""
        if graceful:
            stop_group(self.proc)
        elif self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def stop_group(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM the server's process group; wait until every process in it is gone
    (LitServe's workers outlive its main process for a while and would steal the
    CPU from whatever is measured next), SIGKILL what is left at the timeout."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
