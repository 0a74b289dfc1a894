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


def reference_string(counts) -> str:
    """pycocotools' rleToString, a character at a time, as C writes it."""
    out, counts = [], [int(c) for c in counts]
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def test_rle_string_is_rletostring_for_any_counts():
    """Every count at once (rows of 5-bit groups) writes what the C loop writes: counts of
    one to nine groups, differences from two before that are negative, zero or huge."""
    rng = np.random.default_rng(3)
    cases = [[], [0], [15], [16], [0, 1], [1, 2, 3], [7, 0, 2**40, 1, 3, 2**40 - 5], [2**52, 0, 1, 2**51]]
    for _ in range(2000):
        scale = int(rng.choice([2, 17, 33, 1025, 2**20, 2**35]))
        cases.append(rng.integers(0, scale, int(rng.integers(0, 40))).tolist())
    for counts in cases:
        assert rle_string(counts) == reference_string(counts), counts
        assert rle_string(np.array(counts, np.int64)) == reference_string(counts), counts


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (37, 61), (120, 80)])
def test_class_rles_of_the_transposed_mask_are_the_masks(shape):
    """A mask given as its transpose (its columns as rows, as the server restores it for
    RLE) gets the same RLEs, sized [H, W], as the mask itself."""
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    labels = rng.integers(0, 4, shape, dtype=np.uint8)
    labels[: shape[0] // 2, : shape[1] // 2] = 2  # long runs too
    names = ["a", "b", "c", "d"]
    expected = class_rles(labels, names)
    assert class_rles(np.ascontiguousarray(labels.T), names, transposed=True) == expected
    for name, rle in expected.items():
        assert rle["size"] == list(shape)
        decoded = mask_api.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        np.testing.assert_array_equal(decoded, labels == names.index(name))
