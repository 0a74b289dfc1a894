"""The process's memory: the container's limit, what it holds (RSS), the allocator and
handing free pages back, and the heap frozen out of the garbage collector's full walks.

The CPUs (affinity, cgroup quota, model, flags) are described in ``model/hardware.py``;
the server's threads in :mod:`service.threads`. Read from Linux's ``/proc`` and cgroup files (v2, then
v1); elsewhere they fall back to what ``os`` says, or ``None`` for "unknown".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import re
from pathlib import Path
from typing import Callable, Optional

__all__ = [
    "memory_limit_bytes",
    "rss_bytes",
    "release_free_memory",
    "allocator",
    "freeze_heap",
    "thaw_heap",
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
