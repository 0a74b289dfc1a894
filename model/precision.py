"""Reduced precision where the hardware has it and accuracy holds.

bf16 runs fast on CPUs with AVX512_BF16 or AMX and on GPUs that support it;
elsewhere a CPU emulates it, slower than fp32, so it is refused with a message
(:func:`require`). ``precision="auto"`` is decided once, when a package is
compiled (``python -m model compile --precision auto``): each precision this
device has is compiled, timed at batch 1 and scored on held-out data (mIoU on
the synthetic set of seed 2, which training never saw, or a folder), and the
fastest whose mIoU is within ``TOLERANCE`` of fp32's is chosen and recorded,
never re-measured at start-up.
"""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional

import torch

from . import hardware
from .artifact import ModelLoadError

__all__ = ["TOLERANCE", "hardware_precisions", "require", "evaluate", "choose"]

TOLERANCE = 0.005  # mIoU a reduced precision may lose against fp32


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


def evaluate(segmenter, data: str = "synthetic", count: int = 64, seed: int = 2, batch_size: int = 8) -> Dict:
    """Held-out mIoU and batch-1 milliseconds of a loaded segmenter."""
    from .data import FolderDataset, SyntheticShapes
    from .scores import confusion_matrix, scores

    cfg = segmenter.config
    if data == "synthetic":
        dataset = SyntheticShapes(count, seed=seed, size=tuple(cfg.input_size))
    else:
        dataset = FolderDataset(data, cfg.num_classes, size=tuple(cfg.input_size))
    confusion = torch.zeros(cfg.num_classes, cfg.num_classes, dtype=torch.int64)
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        masks = segmenter.predict([image for image, _ in items], batch_size=batch_size)
        for pred, (_, target) in zip(masks, items):
            confusion += confusion_matrix(torch.from_numpy(pred), target, cfg.num_classes)
    image = [dataset[0][0]]
    prepared = [segmenter.prepare(im) for im in image]
    for _ in range(2):
        segmenter.infer(prepared)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        segmenter.infer(prepared)
        times.append(time.perf_counter() - t)
    return {
        "miou": round(float(scores(confusion, cfg.class_names)["miou"]), 5),
        "batch1_ms": round(statistics.median(times) * 1000, 2),
        "images": len(dataset),
        "data": data if data != "synthetic" else f"synthetic seed {seed}",
    }


def choose(results: Dict[str, Dict], tolerance: float = TOLERANCE) -> str:
    """The fastest precision whose mIoU is within ``tolerance`` of fp32's."""
    if "fp32" not in results:
        raise ValueError("fp32 must be measured: it is the reference")
    bar = results["fp32"]["miou"] - tolerance
    eligible = {p: r for p, r in results.items() if r["miou"] >= bar}
    return min(eligible, key=lambda p: eligible[p]["batch1_ms"])


def describe(results: Dict[str, Dict], chosen: Optional[str]) -> str:
    parts = [f"{p}: mIoU {r['miou']:.4f}, {r['batch1_ms']:.1f} ms" for p, r in results.items()]
    return "; ".join(parts) + (f" -> {chosen}" if chosen else "")
