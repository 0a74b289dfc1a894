"""``precision="auto"``: compile each precision the hardware has, score it, time it,
and keep the fastest that holds accuracy.

Decided once, when a package is compiled (``python -m model compile --precision
auto``, for the bundled model or a file): each precision this device runs
(:func:`model.precision.hardware_precisions`) is compiled, timed at batch 1 and
scored on held-out data (mIoU on the synthetic set of seed 2, which training never
saw, or a folder), and the fastest whose mIoU is within ``TOLERANCE`` of fp32's is
chosen. The figures are recorded in each package's metadata (``evaluation``), so
the choice is never re-measured at start-up.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .artifact import Artifact
from .compiled import compile_package, read_meta
from .data import FolderDataset, SyntheticShapes
from .network import ModelConfig
from .precision import hardware_precisions, require
from .predictor import Segmenter
from .scores import confusion_matrix, scores

__all__ = ["TOLERANCE", "choose", "compile_and_choose", "evaluate"]

log = logging.getLogger(__name__)

TOLERANCE = 0.005  # mIoU a reduced precision may lose against fp32


def evaluate(segmenter, data: str = "synthetic", count: int = 64, seed: int = 2, batch_size: int = 8) -> Dict:
    """Held-out mIoU and batch-1 milliseconds of a loaded segmenter."""
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


def compile_and_choose(
    net: nn.Module,
    config: ModelConfig,
    device: torch.device,
    precision: str,
    path_for: Callable[[str], Path],
    version: str,
    extra_meta: Optional[Dict[str, Any]] = None,
    data: str = "synthetic",
    count: int = 64,
) -> Tuple[Dict[str, Dict], str]:
    """Compile ``net`` for ``device`` into one package per precision, at ``path_for(p)``:
    ``precision`` alone, or with ``auto`` each one the hardware has. Each is scored on
    held-out data (``data``, ``count``) and timed before it is written, and the figures
    are kept in its metadata (``evaluation``).

    Returns:
        The figures by precision, and the choice: with ``auto`` the fastest within
        :data:`TOLERANCE` of fp32's mIoU, else ``precision``.

    Raises:
        ModelLoadError: a precision this device cannot run.
    """
    if precision != "auto":
        require(precision, device)
    candidates = hardware_precisions(device) if precision == "auto" else [precision]
    results: Dict[str, Dict] = {}
    for p in candidates:

        def score(artifact: Artifact, p: str = p) -> dict:
            return evaluate(
                Segmenter(artifact.module, artifact, device, p, artifact.meta["channels_last"]), data, count
            )

        path = path_for(p)
        log.info("compiling %s for %s %s into %s", config.name, device, p, path)
        compile_package(
            copy.deepcopy(net),
            path,
            config,
            device,
            p,
            version=version,
            extra_meta=extra_meta,
            evaluate=score,
        )
        results[p] = read_meta(path)[1]["evaluation"]
    return results, choose(results) if precision == "auto" else precision
