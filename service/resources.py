"""What this process may use: memory (cgroup limit, RSS), and how it uses its CPUs.

The CPUs themselves (affinity, cgroup quota, model, flags) are described in
``model/hardware.py``. Read from Linux's ``/proc`` and cgroup files (v2, then
v1); elsewhere they fall back to what ``os`` says, or ``None`` for "unknown".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import re
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

__all__ = [
    "memory_limit_bytes",
    "rss_bytes",
    "release_free_memory",
    "allocator",
    "freeze_heap",
    "thaw_heap",
    "inference_streams",
    "stream_threads",
    "name_os_thread",
]

_CGROUP = Path("/sys/fs/cgroup")


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def memory_limit_bytes() -> Optional[int]:
    """The cgroup's memory limit (a container's), or None when unlimited or unknown."""
    for path in (_CGROUP / "memory.max", _CGROUP / "memory" / "memory.limit_in_bytes"):
        value = _read(path)
        if value and value.isdigit() and int(value) < (1 << 60):  # v1 says "unlimited" with a huge number
            return int(value)
    return None


def rss_bytes() -> int:
    """This process's resident memory now."""
    status = _read(Path("/proc/self/status")) or ""
    match = re.search(r"VmRSS:\s+(\d+)", status)
    return int(match.group(1)) * 1024 if match else 0


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    """The process's global symbols (libc's, and a preloaded allocator's)."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _releaser() -> tuple[str, Optional[Callable[[], object]]]:
    maps = _read(Path("/proc/self/maps")) or ""
    if "tcmalloc" in maps:
        # the preloaded tcmalloc's symbols are global
        return "tcmalloc", getattr(_libc(), "MallocExtension_ReleaseFreeMemory", None)
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return "unknown", None
    trim.argtypes = [ctypes.c_size_t]
    return "glibc", functools.partial(trim, 0)


def allocator() -> str:
    """The malloc in use: ``tcmalloc`` (preloaded), ``glibc`` or ``unknown``."""
    return _releaser()[0]


def release_free_memory() -> None:
    """Hand memory the allocator holds but no one uses back to the OS.

    Called after each large image (tens of MB): glibc keeps a freed block in
    the arena of the thread that freed it, and tcmalloc keeps freed pages for
    reuse, so after a burst of large images the process would stay at the sum
    of every thread's high-water mark instead of what it holds (measured with
    the hostile mix of tests/reliability/test_memory.py: glibc 2.17 GiB, over
    a 2 GiB pod's limit). Small requests never call it, so the pages the model's
    own tensors reuse each batch stay mapped.
    """
    release = _releaser()[1]
    if release is not None:
        release()


def freeze_heap() -> None:
    """Collect the younger generations' garbage, then take every object alive now (the
    imported modules, the loaded model, the app) out of the cyclic collector's sight
    (``gc.freeze``). Not a full collection first: it would walk the very heap being
    frozen (~100 ms in a server, ~0.3 s in a test process) to find ~30 more objects.

    A full collection walks every tracked object while holding the GIL, so every
    thread stops for it: ~210,000 objects in a ready server, 90-150 ms here (the
    event loop, the I/O pool and the inference threads' Python all wait). It comes
    whenever enough objects outlive the younger generations. Frozen, the start-up
    heap is skipped and a full collection takes 0.2-16 ms. Frozen objects are still
    freed when their last reference goes; only cycles among them wait for
    :func:`thaw_heap`.
    """
    gc.collect(1)
    gc.freeze()


def thaw_heap() -> None:
    """Give the frozen objects back to the collector (before collecting a retired model, at shutdown)."""
    gc.unfreeze()


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
    (measured there: README, Performance), else 1. Streams beyond 1 are for the CPU:
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
