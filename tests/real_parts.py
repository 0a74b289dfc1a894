"""Real parts the suite checks against (Prometheus, promtool, kubectl, a Docker
engine, hadolint, tritonclient, ...): found, or skipped locally with the reason,
or a failure under CI.

A developer without Docker can still run ``make test``: the check is skipped,
and the end of the run lists every real-part check that did not run and how to
install what it needs. Under CI (``CI=true``, which ``.ci/run`` sets) a missing
part fails the test instead: a check that quietly stops running is worse than
one that was never claimed.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import pytest

__all__ = ["MARK", "in_ci", "need_tool", "missing"]

MARK = "real part missing:"
_VENV_BIN = Path(sys.executable).parent


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(what: str, install: str) -> NoReturn:
    """Skip (locally) or fail (under CI): ``what`` is not here; ``install`` says how to get it."""
    message = f"{MARK} {what} (install: {install})"
    if in_ci():
        pytest.fail(f"{message}; under CI every real-part check must run", pytrace=False)
    pytest.skip(message)


def need_tool(name: str, install: str) -> str:
    """The path of command ``name`` (on PATH or beside this Python), else :func:`missing`."""
    path = shutil.which(name) or (str(_VENV_BIN / name) if (_VENV_BIN / name).exists() else None)
    if path is None:
        missing(name, install)
    return path
