"""COCO run-length encoding of masks: the compressed ``counts`` string that
``pycocotools.mask.encode`` writes and ``pycocotools.mask.decode`` reads.

A binary mask is read in column-major order (COCO's convention), its runs counted
alternately from a run of zeros (possibly empty), and the counts packed 5 bits to
a character, each count after the second stored as the difference from the count
two before (COCO's ``rleToString``). ``class_rles`` does it per class of a label mask.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

__all__ = ["rle_counts", "rle_string", "class_rles"]


def rle_counts(binary: np.ndarray) -> np.ndarray:
    """Run lengths of an ``(H, W)`` boolean mask in column-major order, zeros first."""
    flat = np.asarray(binary, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return np.zeros(0, np.int64)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], edges, [flat.size]))
    counts = np.diff(bounds)
    return np.concatenate(([0], counts)) if flat[0] else counts


def rle_string(counts: Sequence[int]) -> str:
    """COCO's compressed form of run lengths (``rleToString`` in pycocotools' maskApi.c)."""
    out = []
    counts = [int(c) for c in counts]
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as C's on a signed long
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def class_rles(mask: np.ndarray, class_names: Sequence[str]) -> Dict[str, dict]:
    """Per class present in an ``(H, W)`` label mask, its COCO RLE ``{"size": [H, W], "counts": str}``.

    The label runs are found once, in one column-major pass; each class's binary runs
    follow from them (the gaps between its runs are its zeros), so the cost is one
    pass over the pixels plus one per run, not one pass per class."""
    h, w = mask.shape
    flat = np.ascontiguousarray(mask.T).ravel()
    n = flat.size
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [n]))
    values = flat[starts]
    out: Dict[str, dict] = {}
    for c in np.unique(values):
        if c >= len(class_names):
            continue
        chosen = np.flatnonzero(values == c)
        s, e = starts[chosen], ends[chosen]
        counts = np.empty(2 * len(s), np.int64)
        counts[0::2] = s - np.concatenate(([0], e[:-1]))  # zeros before each run
        counts[1::2] = e - s  # the run
        if e[-1] < n:
            counts = np.append(counts, n - e[-1])
        out[class_names[int(c)]] = {"size": [int(h), int(w)], "counts": rle_string(counts)}
    return out
