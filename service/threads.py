"""The server's threads: the names they give the OS (``chanseg-io_N``, ``chanseg-infer_0``,
...), how many inference streams run side by side, and each one's share of torch's threads."""

from __future__ import annotations

import ctypes
import sys
import threading

from .resources import _libc

__all__ = ["name_os_thread", "inference_streams", "stream_threads"]


def name_os_thread() -> None:
    """Give the calling thread's Python name (``chanseg-io_0``, ``chanseg-infer_0``, ...)
    to the OS thread as well, cut to Linux's 15 bytes: ``top -H``, ``ps -L``, perf and
    ``/proc/<pid>/task/*/comm`` then tell the server's threads apart (``python -m
    benchmarks run`` splits the server's CPU by it), and the OpenMP workers an inference
    thread starts inherit its name. The thread pools run it as their initializer; it
    does nothing off Linux (Python 3.14 names its threads itself)."""
    if not sys.platform.startswith("linux"):
        return
    libc = _libc()
    if libc is not None:
        name = threading.current_thread().name.encode("utf-8", "replace")[:15]
        libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME


def inference_streams(setting, device, threads: int) -> int:
    """``INFERENCE_STREAMS`` for this device: ``auto`` is 2 on a CPU with 2 torch threads
    (measured there: docs/performance.md, "Streams"), else 1. Streams beyond 1 are for the CPU:
    side by side forward passes on one GPU would need CUDA streams, not built."""
    if device.type != "cpu":
        if setting not in ("auto", 1):
            raise ValueError(
                f"INFERENCE_STREAMS={setting} is for CPU inference; on {device} it must be 1 or auto"
            )
        return 1
    if setting == "auto":
        return 2 if threads == 2 else 1
    return int(setting)


def stream_threads(threads: int, streams: int) -> int:
    """Torch threads for a batch running beside others: its share of ``threads``."""
    return max(1, threads // streams)
