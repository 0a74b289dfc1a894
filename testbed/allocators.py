"""The allocators a server may run with (``LD_PRELOAD``), and where their libraries are:
glibc's malloc, jemalloc, tcmalloc (see docs/performance.md, "Allocator")."""

from __future__ import annotations

import ctypes.util
from pathlib import Path

__all__ = ["ALLOCATORS", "find_library"]

ALLOCATORS = {
    "glibc": None,
    "jemalloc": ["libjemalloc.so.2"],
    "tcmalloc": ["libtcmalloc_minimal.so.4", "libtcmalloc.so.4"],
}


def find_library(names):
    """The path of the first of ``names`` found (the usual library folders, then ctypes), or None."""
    for name in names:
        for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib"):
            if Path(d, name).exists():
                return str(Path(d, name))
        found = ctypes.util.find_library(name.split(".so")[0].removeprefix("lib"))
        if found:
            return found
    return None
