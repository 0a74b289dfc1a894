"""The devices chanseg runs on, as users name them: ``auto``, ``cpu``, ``cuda`` or
``cuda:N``, the same in ``model.load``, ``python -m model``, training and the
server's ``DEVICE`` setting, and :func:`resolve_device`, which turns a name into a
``torch.device`` that exists here (or says why not).
"""

from __future__ import annotations

import re

import torch

from .artifact import ModelLoadError

__all__ = ["DEVICE_HELP", "DEVICE_NAMES", "resolve_device"]

DEVICE_NAMES = re.compile(r"auto|cpu|cuda(:\d+)?")
DEVICE_HELP = "auto, cpu, cuda or cuda:N"  # what every help text and error message says


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda``/``cuda:N`` checked to exist.

    Raises:
        ModelLoadError: an unknown name, or a CUDA device this machine does not have.
    """
    if not isinstance(device, torch.device) and not DEVICE_NAMES.fullmatch(str(device)):
        raise ModelLoadError(f"unknown device {device!r}: use {DEVICE_HELP}")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: use {DEVICE_HELP}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ModelLoadError(f"unsupported device {device!r}: use {DEVICE_HELP}")
    return dev
