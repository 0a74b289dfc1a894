"""Segmentation scores from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

What ``python -m model eval``, training's validation and ``precision="auto"`` measure
a model by (the server's Prometheus metrics are ``service/metrics.py``)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor

__all__ = ["confusion_matrix", "scores"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = target, columns = prediction.

    ``pred`` and ``target`` hold class ids of the same shape; target ids outside
    ``[0, num_classes)`` are ignored.
    """
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    index = target[keep] * num_classes + pred[keep]
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def scores(confusion: Tensor, class_names: Sequence[str]) -> Dict[str, object]:
    """IoU per class, mIoU over classes present in target or prediction, pixel accuracy."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou: List[float | None] = [
        float(tp[i] / union[i]) if union[i] > 0 else None for i in range(len(class_names))
    ]
    present = [v for v in iou if v is not None]
    total = float(confusion.sum())
    return {
        "iou": dict(zip(class_names, iou)),
        "miou": sum(present) / len(present) if present else 0.0,
        "pixel_accuracy": float(tp.sum()) / total if total else 0.0,
        "pixels": int(total),
    }
