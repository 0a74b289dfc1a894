"""COCO RLE: what pycocotools decodes, and what it encodes, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from model.rle import class_rles, rle_counts, rle_string

mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools is in the dev extra")


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 48), (300, 257)])
def test_matches_pycocotools(shape):
    rng = np.random.default_rng(shape[0])
    for density in (0.0, 0.03, 0.5, 1.0):
        binary = rng.random(shape) < density
        theirs = mask_api.encode(np.asfortranarray(binary.astype(np.uint8)))
        ours = rle_string(rle_counts(binary))
        assert ours == theirs["counts"].decode(), (shape, density)
        decoded = mask_api.decode({"size": list(shape), "counts": ours.encode()})
        np.testing.assert_array_equal(decoded, binary)


def test_class_rles_decode_to_each_class():
    labels = np.zeros((40, 60), np.uint8)
    labels[5:20, 10:30] = 1
    labels[25:35, 40:55] = 3
    rles = class_rles(labels, ["background", "circle", "rectangle", "triangle"])
    assert set(rles) == {"background", "circle", "triangle"}  # classes absent from the mask are left out
    for c, name in enumerate(["background", "circle", "rectangle", "triangle"]):
        if name in rles:
            decoded = mask_api.decode({"size": rles[name]["size"], "counts": rles[name]["counts"].encode()})
            np.testing.assert_array_equal(decoded, labels == c)


@pytest.mark.parametrize("seed", range(5))
def test_class_rles_equal_pycocotools_on_random_label_masks(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, (int(rng.integers(1, 60)), int(rng.integers(1, 60))), dtype=np.uint8)
    names = ["a", "b", "c", "d"]
    rles = class_rles(labels, names)
    for c, name in enumerate(names):
        binary = labels == c
        if not binary.any():
            assert name not in rles
            continue
        expected = mask_api.encode(np.asfortranarray(binary.astype(np.uint8)))["counts"].decode()
        assert rles[name]["counts"] == expected
