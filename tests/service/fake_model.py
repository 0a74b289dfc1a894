"""A model with no network at all that implements exactly :class:`service.interface.ServedModel`.

Each pixel's class is its brightness band (dark, mid, light): easy to predict in a
test, and any member the service used beyond the declared interface would raise
AttributeError here."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from model import ModelConfig
from model.preprocess import nearest_indices, prepare_image


class FakeModel:
    def __init__(self, input_size: Tuple[int, int] = (32, 32)) -> None:
        self.config = ModelConfig(
            num_classes=3,
            class_names=("dark", "mid", "light"),
            input_size=input_size,
            name="fake",
            network="imported",
        )
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.format = "fake"
        self.batches: list = []

    @property
    def name(self) -> str:
        return "fake"

    @property
    def version(self) -> str:
        return "2"

    @property
    def max_batch(self) -> Optional[int]:
        return 8

    @property
    def path(self):
        return None

    def prepare(self, image) -> torch.Tensor:
        return torch.from_numpy(np.array(prepare_image(image, self.config.input_size)))

    def logits(self, prepared: Sequence[torch.Tensor]) -> torch.Tensor:
        self.batches.append(len(prepared))
        grey = torch.stack(list(prepared)).float().mean(-1)  # (N, h, w)
        centres = (torch.arange(3, dtype=torch.float32) + 0.5) * 256 / 3
        return -(grey[:, None] - centres[None, :, None, None]).abs() / 32  # nearest band wins

    @staticmethod
    def labels(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1).to(torch.uint8)

    def infer(self, prepared: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.labels(self.logits(prepared))

    @staticmethod
    def _upsample(array: np.ndarray, size, axes, out=None) -> np.ndarray:
        rows, cols = (
            nearest_indices(array.shape[axes[0]], int(size[0])),
            nearest_indices(array.shape[axes[1]], int(size[1])),
        )
        tall = np.take(array, rows, axis=axes[0])
        return np.take(tall, cols, axis=axes[1], out=out)

    def restore(self, labels: torch.Tensor, size, out=None) -> np.ndarray:
        return self._upsample(labels.numpy(), size, (0, 1), out)

    def probabilities(self, logits: torch.Tensor, size, out=None) -> np.ndarray:
        x = logits.float().numpy()
        x = np.exp(x - x.max(axis=0, keepdims=True))
        x /= x.sum(axis=0, keepdims=True)
        return self._upsample(x.astype(np.float32), size, (1, 2), out)

    def class_counts(self, labels: torch.Tensor, size, num_classes: int) -> np.ndarray:
        return np.bincount(self.restore(labels, size).ravel(), minlength=num_classes)[:num_classes]


def banded(height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """An image in three horizontal bands (dark, mid, light) and its expected mask."""
    image = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    third = height // 3
    for band, value in enumerate((20, 128, 235)):
        rows = slice(band * third, (band + 1) * third if band < 2 else height)
        image[rows], mask[rows] = value, band
    return image, mask
