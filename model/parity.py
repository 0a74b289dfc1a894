"""Parity at import: an artifact's logits against the framework it came from, before it is kept.

A converted model is checked as a server runs it (loaded on the CPU in fp32, frozen,
channels-last), on synthetic images (:func:`model.data.synthetic_sample`, seed 3):
at the input size as a batch of 3 and a batch of 1 (the trace was taken on 2), and at a
larger size (each side plus the largest power of two dividing it, so a U-Net's
divisibility holds) unless the source fixes its input. The largest absolute difference
of the logits must stay under :data:`TOLERANCE`; where the source's own output was
probabilities, the probabilities the logits give are held to it too; the masks (the
argmax) are compared with the source's own. The report goes into the artifact's
metadata as ``parity``.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .artifact import TORCHSCRIPT
from .data import synthetic_sample
from .imported import ModelImportError
from .loading import load
from .network import ModelConfig
from .preprocess import normalize

__all__ = [
    "TOLERANCE",
    "PARITY_SEED",
    "Batch",
    "Proof",
    "first_line",
    "synthetic_inputs",
    "measure",
    "write_proven",
]

TOLERANCE = 1e-4  # the largest absolute difference of fp32 logits allowed
PARITY_SEED = 3  # model.data's synthetic images (seeds 0-2 are training, validation, held-out)


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line (framework errors run to pages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def synthetic_inputs(config: ModelConfig, second_size: bool = True) -> List[Tuple[Tuple[int, int], Tensor]]:
    """Normalised ``(N, 3, H, W)`` batches: 3 images and 1 at the input size, and with
    ``second_size`` 1 at the larger size (see the module docstring)."""
    h, w = config.input_size
    sizes = [(h, w, 3), (h, w, 1)]
    if second_size:
        sizes.append((h + (h & -h), w + (w & -w), 1))
    batches = []
    for i, (sh, sw, n) in enumerate(sizes):
        images = np.stack([synthetic_sample(PARITY_SEED, 10 * i + j, (sh, sw)).image for j in range(n)])
        batches.append(((sh, sw), normalize(torch.from_numpy(images), config)))
    return batches


@dataclass(frozen=True)
class Batch:
    """One batch of the check and what the source made of it.

    Attributes:
        size: ``(H, W)``.
        x: the normalised batch ``(N, 3, H, W)``.
        logits: the source's logits ``(N, C, H, W)`` for it (what the artifact must return).
        masks: the source's own masks ``(N, H, W)``, as its users compute them.
        outputs: the source's own outputs ``(N, C', H, W)`` where they were probabilities.
    """

    size: Tuple[int, int]
    x: Tensor
    logits: Tensor
    masks: Tensor
    outputs: Optional[Tensor] = None


@dataclass(frozen=True)
class Proof:
    """What an artifact is held to.

    Attributes:
        reference: the source, in words (``keras 3.15.1, torch backend``).
        batches: the check's batches.
        probabilities: the artifact's logits -> what the source's outputs were (its
            softmax or sigmoid), where they were probabilities; else None.
    """

    reference: str
    batches: Sequence[Batch]
    probabilities: Optional[Callable[[Tensor], Tensor]] = None


def measure(candidate: Callable[[Tensor], Tensor], proof: Proof) -> Dict[str, Any]:
    """The parity report of ``candidate`` (normalised batch -> logits) against ``proof``."""
    checked: List[Dict[str, Any]] = []
    differing = pixels = 0
    probability_diff = 0.0
    for batch in proof.batches:
        (h, w), n = batch.size, batch.x.shape[0]
        with torch.no_grad():
            try:
                got = candidate(batch.x).float()
            except Exception as exc:
                raise ModelImportError(
                    f"the converted model fails on a {h}x{w} batch of {n} where the source runs "
                    f"({first_line(exc)}): a shape was fixed when it was converted; it cannot be imported"
                ) from exc
            want = batch.logits
            if got.shape != want.shape:
                raise ModelImportError(
                    f"the converted model returns {tuple(got.shape)} for a {h}x{w} batch of {n}, the source "
                    f"{tuple(want.shape)}: a shape was fixed when it was converted; it cannot be imported"
                )
            if proof.probabilities is not None and batch.outputs is not None:
                diff = float((proof.probabilities(got) - batch.outputs).abs().max())
                probability_diff = max(probability_diff, diff)
        differing += int((got.argmax(1) != batch.masks).sum())
        pixels += batch.masks.numel()
        checked.append({"size": [h, w], "batch": int(n), "max_abs_diff": float((got - want).abs().max())})
    report: Dict[str, Any] = {
        "reference": proof.reference,
        "sizes": [list(s) for s in dict.fromkeys(tuple(c["size"]) for c in checked)],
        "checked": checked,
        "max_abs_diff": max(c["max_abs_diff"] for c in checked),
        "tolerance": TOLERANCE,
        "masks_identical": differing == 0,
        "mask_pixels_differing": differing,
        "mask_pixels": pixels,
    }
    if proof.probabilities is not None:
        report["probabilities_max_abs_diff"] = probability_diff
    return report


def held(report: Dict[str, Any], what: str) -> None:
    """Refuse (:class:`ModelImportError`) a report over the tolerance."""
    worst = max(report["checked"], key=lambda c: c["max_abs_diff"])
    diff = max(report["max_abs_diff"], report.get("probabilities_max_abs_diff", 0.0))
    if not diff <= TOLERANCE:  # NaN fails too
        size = "x".join(str(s) for s in worst["size"])
        raise ModelImportError(
            f"{what} differs from {report['reference']} by {diff:.3g} (tolerance {TOLERANCE:g}; worst at {size}, "
            f"batch {worst['batch']}): it computes something else (a shape or batch size fixed when it was "
            "converted, a layer that behaves otherwise in inference); nothing was written"
        )


def write_proven(
    write: Callable[[Path, Dict[str, Any]], Path],
    out: str | os.PathLike,
    proof: Proof,
    what: str,
    about: Dict[str, Any],
    started: float,
) -> Path:
    """``write(path, parity)`` a draft into a temporary folder, load it as a server does
    (CPU, fp32, frozen, channels-last), hold it to ``proof``, then ``write`` the artifact
    at ``out`` with the report (and ``about``, and the seconds since ``started``) as its
    ``parity`` metadata. Nothing is written at ``out`` when the check fails."""
    with tempfile.TemporaryDirectory() as tmp:
        seg = load(write(Path(tmp) / "draft.pt", {}), device="cpu", precision="fp32", format=TORCHSCRIPT)
        report = measure(lambda x: seg.module(x.contiguous(memory_format=seg.memory_format)), proof)
    held(report, what)
    report.update(about)
    report["images"] = f"synthetic (model.data.synthetic_sample, seed {PARITY_SEED})"
    report["seconds"] = round(time.perf_counter() - started, 2)
    return write(Path(out), report)


def summary(report: Dict[str, Any]) -> str:
    """A parity report (an artifact's ``parity`` metadata) in a few lines, as ``python -m
    model import`` prints it."""
    checks = ", ".join(
        f"{'x'.join(map(str, c['size']))} batch {c['batch']}: {c['max_abs_diff']:.2g}"
        for c in report["checked"]
    )
    lines = [
        f"parity with {report['reference']}: max |logits difference| {report['max_abs_diff']:.2g} "
        f"(tolerance {report['tolerance']:g}; {checks})",
        f"masks identical: {'yes' if report['masks_identical'] else 'no'} "
        f"({report['mask_pixels_differing']} of {report['mask_pixels']} pixels differ)",
        f"head: {report['head_detail']}",
    ]
    if "probabilities_max_abs_diff" in report:
        lines.append(
            f"probabilities against the source's own: max difference {report['probabilities_max_abs_diff']:.2g}"
        )
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    lines.append(f"imported in {report['seconds']:.1f} s")
    return "\n".join(lines)
