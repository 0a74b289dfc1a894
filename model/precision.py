"""The precisions a model runs in: their names, their torch dtypes, and which of them
this hardware runs natively.

bf16 runs fast on CPUs with AVX512_BF16 or AMX and on GPUs that support it;
elsewhere a CPU emulates it, slower than fp32, so it is refused with a message
(:func:`require`). ``precision="auto"`` is not decided here but measured once, when
a package is compiled (``model/autoprecision.py``).
"""

from __future__ import annotations

from typing import List

import torch

from . import hardware
from .artifact import ModelLoadError

__all__ = ["PRECISIONS", "hardware_precisions", "require"]

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def hardware_precisions(device: torch.device) -> List[str]:
    """Precisions this device runs natively, fp32 first."""
    if device.type == "cuda":
        return ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    # fp16 on a CPU: even with AMX-FP16 it ran slower than fp32 here (115 vs 83 ms at
    # batch 1, compiled), so a CPU is offered fp32 and, where it has the instructions, bf16.
    flags = hardware.cpu_flags()
    if not flags:  # not Linux: cannot tell, allow what torch can run
        return ["fp32", "bf16"]
    return ["fp32"] + (["bf16"] if flags & {"avx512_bf16", "amx_bf16"} else [])


def require(precision: str, device: torch.device) -> None:
    """Raise :class:`ModelLoadError` unless ``device`` runs ``precision`` natively."""
    if precision not in hardware_precisions(device):
        if device.type == "cuda":
            raise ModelLoadError(f"{precision} is not supported on {hardware.gpu_name(device)}")
        why = "no AVX512_BF16 or AMX" if precision == "bf16" else "it ran slower than fp32 on CPUs measured"
        raise ModelLoadError(f"{precision} is not supported on this CPU ({why}): use fp32, or precision auto")
