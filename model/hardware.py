"""The machine this process runs on: its CPU (model name and instruction sets, read
from ``/proc/cpuinfo``), the CPUs it may use (affinity, a container's CPU quota), its
GPUs, and the one-line descriptions built from them.

A container sees the host's CPU count in ``os.cpu_count()``; sizing thread pools
from it gives a 2-CPU pod on a 64-core node dozens of threads, so
:func:`available_cpus` reads the affinity mask and the cgroup quota (v2, then v1).
Where a Linux file is missing each answer falls back to what ``os`` and
``platform`` say, or to "unknown" (no CPU flags: nothing to check against).

Three descriptions, one per use:

- :func:`device_description`: what a measurement on a device holds for (the server's
  batch-size measurement is keyed by it);
- :func:`machine_key`: what a compiled package is specific to (the GPU, or the CPU's
  instruction sets), in the bundled model's cache file names;
- :func:`host_description`: the machine a benchmark ran on, for its report.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import platform
from pathlib import Path
from typing import Dict, Optional, Set

import torch

__all__ = [
    "available_cpus",
    "cpu_flags",
    "cpu_info",
    "cpu_model",
    "device_description",
    "gpu_name",
    "host_description",
    "machine_key",
    "parse_cpuinfo",
]

_CPUINFO = Path("/proc/cpuinfo")
_CGROUP = Path("/sys/fs/cgroup")
UNKNOWN_CPU = "unknown CPU"


def parse_cpuinfo(text: str) -> Dict[str, str]:
    """``/proc/cpuinfo``'s ``key : value`` lines, the first value of each key (the first
    processor's; all processors of a machine share the model name and flags)."""
    fields: Dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


@functools.lru_cache(maxsize=1)
def cpu_info() -> Dict[str, str]:
    """This machine's :func:`parse_cpuinfo` (read once); empty where there is no
    ``/proc/cpuinfo`` (not Linux)."""
    try:
        return parse_cpuinfo(_CPUINFO.read_text())
    except OSError:
        return {}


def cpu_model() -> str:
    """The CPU's model name, or ``unknown CPU``."""
    return cpu_info().get("model name") or UNKNOWN_CPU


def cpu_flags() -> Set[str]:
    """This CPU's feature flags (``avx512f``, ``amx_bf16``, ...); empty where unknown."""
    return set(cpu_info().get("flags", "").split())


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_quota() -> Optional[float]:
    """CPUs allowed by the cgroup's CFS quota, or None when unlimited or unknown."""
    v2 = _read(_CGROUP / "cpu.max")  # "max 100000" or "200000 100000"
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota, period = _read(_CGROUP / "cpu" / "cpu.cfs_quota_us"), _read(_CGROUP / "cpu" / "cpu.cfs_period_us")
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def gpu_name(device: torch.device) -> str:
    """The name of CUDA device ``device`` (``cuda``: the current one)."""
    return torch.cuda.get_device_name(_cuda_index(device))


def device_description(device: torch.device) -> str:
    """The kind of machine a measurement on ``device`` holds for: the GPU's name and
    compute capability, or the CPU's model and how many of its CPUs and threads this
    process uses."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(_cuda_index(device))
        return f"{gpu_name(device)} (compute {major}.{minor})"
    return f"{cpu_model()}, {available_cpus()} CPUs, {torch.get_num_threads()} threads"


def machine_key(device: torch.device) -> str:
    """What code compiled for ``device`` is specific to, as a short name: ``cuda-`` and a
    hash of the GPU's name, or ``cpu-`` and a hash of the CPU's AVX and AMX flags."""
    if device.type == "cuda":
        return "cuda-" + hashlib.sha256(gpu_name(device).encode()).hexdigest()[:8]
    isa = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))
    return "cpu-" + hashlib.sha256(" ".join(isa).encode()).hexdigest()[:8]


def host_description() -> str:
    """The machine as a benchmark report names it: CPU model, cores, operating system."""
    cpu = cpu_model()
    if cpu == UNKNOWN_CPU:
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
