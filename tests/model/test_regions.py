"""Connected regions (model.regions) against scipy.ndimage.label on the full-size mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.predictor import Segmenter
from model.regions import label_runs, regions

NAMES = ("background", "circle", "rectangle", "triangle")


def reference(mask: np.ndarray, names=NAMES) -> list:
    """Every region of every class but background, by scipy (8-connected), largest first."""
    ndimage = pytest.importorskip("scipy.ndimage", reason="scipy is in the dev extra")
    out = []
    for c, name in enumerate(names):
        if name == "background":
            continue
        labelled, _ = ndimage.label(mask == c, structure=np.ones((3, 3)))
        for i, (ys, xs) in enumerate(ndimage.find_objects(labelled)):
            pixels = int((labelled[ys, xs] == i + 1).sum())
            out.append((name, [xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start], pixels))
    return sorted(out, key=lambda r: (-r[2], r[0], r[1]))


def found(labels: np.ndarray, size, names=NAMES, limit=10**6) -> tuple:
    got, total = regions(labels, size, names, limit)
    return sorted(
        ((r["class"], r["bbox"], r["pixels"]) for r in got), key=lambda r: (-r[2], r[0], r[1])
    ), total


def test_regions_equal_scipy_on_the_restored_mask_at_any_size():
    rng = np.random.default_rng(1)
    for trial in range(300):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        labels = (rng.random((h, w)) * rng.integers(1, 5)).astype(np.uint8)
        if trial % 2:  # blobs rather than noise: fewer, larger regions with holes and diagonals
            labels = np.kron(labels[: max(1, h // 4), : max(1, w // 4)], np.ones((4, 4), np.uint8))[:h, :w]
        size = tuple(int(v) for v in rng.integers(1, 120, 2))  # smaller and larger than the labels
        mask = Segmenter.restore(torch.from_numpy(labels), size)
        expected = reference(mask)
        got, total = found(labels, size)
        assert total == len(expected), (trial, size)
        assert got == expected, (trial, size)


def test_regions_of_a_model_sized_mask_equal_scipy():
    """256x256 labels (a served model's size) of blobs, shapes and stray pixels, restored
    to the size of a phone photo, the same size and a thumbnail."""
    rng = np.random.default_rng(7)
    labels = np.kron(rng.integers(0, 4, (16, 16), dtype=np.uint8), np.ones((16, 16), np.uint8))
    labels[rng.random((256, 256)) < 0.01] = 2
    labels[100:180, 30:60] = 3
    for size in [(256, 256), (3024, 4032), (90, 120)]:
        got, total = found(labels, size)
        expected = reference(Segmenter.restore(torch.from_numpy(labels), size))
        assert (got, total) == (expected, len(expected)), size


def test_diagonal_touch_joins_and_background_is_left_out():
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 2]], np.uint8)
    got, total = found(labels, (3, 3))
    assert total == 2
    assert got == [("circle", [0, 0, 2, 2], 2), ("rectangle", [2, 2, 1, 1], 1)]
    got, _ = found(labels, (6, 9))  # each label pixel is 2 rows x 3 columns
    assert got == [("circle", [0, 0, 6, 4], 12), ("rectangle", [6, 4, 3, 2], 6)]


def test_the_largest_regions_are_kept_and_all_counted():
    labels = np.zeros((10, 10), np.uint8)
    labels[0, ::2] = 1  # five one-pixel regions
    labels[5:9, 5:9] = 3  # one of 16
    got, total = regions(labels, (10, 10), NAMES, limit=2)
    assert total == 6
    assert [(r["class"], r["pixels"]) for r in got] == [("triangle", 16), ("circle", 1)]


def test_an_empty_mask_has_no_runs():
    for shape in [(0, 5), (5, 0), (0, 0)]:
        assert [len(part) for part in label_runs(np.zeros(shape, np.uint8))] == [0, 0, 0, 0]


def test_no_regions_in_an_all_background_mask():
    assert regions(np.zeros((8, 8), np.uint8), (100, 50), NAMES) == ([], 0)
