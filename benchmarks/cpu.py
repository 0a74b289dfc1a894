"""Where a server's CPU goes: the CPU time of its processes by thread role, from Linux's ``/proc``.

A server started in a session of its own (``benchmarks.servers``) is its process
group: LitServe's worker processes are counted with it. chanseg names its threads
(``service.resources.name_os_thread``), so its time splits into

- ``inference``: the inference threads and the OpenMP workers they started
  (``chanseg-infer*``): the forward passes, and the batching around them;
- ``io``: the I/O pool (``chanseg-io*``): decoding, resizing, mask encoding;
- ``main``: each process's main thread; chanseg's runs the event loop: HTTP, the
  ASGI stack, the request's own code;
- ``other``: every other thread, and threads that have exited.

Other servers have no named threads: their time is ``main`` (the naive server's
runs the forward passes too, and so do LitServe's inference processes') and
``other`` (their OpenMP workers). ``total`` is every process's whole CPU time
(``/proc/<pid>/stat`` counts exited threads as well).

Off Linux there is no ``/proc``: :func:`group_cpu` returns None and the benchmarks
go without the split.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

__all__ = ["ROLES", "group_cpu", "per_image"]

ROLES = ("inference", "io", "main", "other")
_PROC = Path("/proc")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(path: Path) -> Optional[Tuple[str, int, float]]:
    """(comm, process group, CPU seconds) from a ``stat`` file; None once it is gone."""
    try:
        text = path.read_text()
    except OSError:  # the process or thread exited meanwhile
        return None
    comm, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
    return comm, int(fields[2]), (int(fields[11]) + int(fields[12])) / _TICK


def _role(comm: str, tid: str, pid: str) -> str:
    if comm.startswith("chanseg-infer"):
        return "inference"
    if comm.startswith("chanseg-io"):
        return "io"
    return "main" if tid == pid else "other"


def _members(pgid: int) -> Iterator[str]:
    """The pid of each process in the group."""
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(entry / "stat")
            if stat is not None and stat[1] == pgid:
                yield entry.name


def group_cpu(pgid: int) -> Optional[Dict[str, float]]:
    """CPU seconds so far of process group ``pgid``: per role (:data:`ROLES`) and ``total``.
    None where there is no ``/proc``."""
    if not (_PROC / "self" / "stat").exists():
        return None
    out = dict.fromkeys((*ROLES, "total"), 0.0)
    for pid in _members(pgid):
        named = 0.0
        for task in (_PROC / pid / "task").glob("*"):
            stat = _stat(task / "stat")
            if stat is not None:
                role = _role(stat[0], task.name, pid)
                if role != "other":
                    out[role] += stat[2]
                    named += stat[2]
        stat = _stat(_PROC / pid / "stat")  # after its threads: the total has all they had
        if stat is not None:
            out["other"] += max(0.0, stat[2] - named)
            out["total"] += max(stat[2], named)
    return out


def per_image(
    before: Optional[Dict[str, float]], after: Optional[Dict[str, float]], images: int
) -> Optional[dict]:
    """Milliseconds of CPU per image between two :func:`group_cpu` readings. (The kernel
    rounds each thread's time and the process's separately, so ``other`` can come out
    a clock tick below zero: it is shown as 0.)"""
    if before is None or after is None or images <= 0:
        return None
    out = {role: 1000 * (after[role] - before[role]) / images for role in after}
    out["other"] = max(0.0, out["other"])
    return out
