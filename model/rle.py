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

from .preprocess import nearest_indices

__all__ = ["rle_counts", "rle_string", "class_rles", "column_runs", "RLE_BYTES_PER_RUN"]


def rle_counts(binary: np.ndarray) -> np.ndarray:
    """Run lengths of an ``(H, W)`` boolean mask in column-major order, zeros first."""
    flat = np.asarray(binary, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return np.zeros(0, np.int64)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], edges, [flat.size]))
    counts = np.diff(bounds)
    return np.concatenate(([0], counts)) if flat[0] else counts


_CHUNK = 1 << 16  # counts written at a time: rle_string's temporaries stay under ~5 MB


def rle_string(counts: Sequence[int] | np.ndarray) -> str:
    """COCO's compressed form of run lengths (``rleToString`` in pycocotools' maskApi.c):
    each count (after the second, less the count two before) in 5-bit groups, least
    significant first, as few as hold it as a signed number, each but the last with
    0x20 set, each group + 48 a character. A block of counts at a time, a row of groups
    each (a Python loop per character took 8.2 ms for a 2048x2048 mask's 20,000 counts,
    this 1.1). Counts below 2**53 (a mask's are)."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    return "".join(
        _written(counts, at, min(at + _CHUNK, counts.size)) for at in range(0, counts.size, _CHUNK)
    )


def _written(counts: np.ndarray, start: int, stop: int) -> str:
    x = counts[start:stop].copy()
    first = max(start, 3)  # the first count stored as a difference
    if first < stop:
        x[first - start :] -= counts[first - 2 : stop - 2]
    magnitude = np.where(x < 0, ~x, x)
    bits = np.frexp(magnitude.astype(np.float64))[1]  # each one's bit length
    groups = (bits + 5) // 5  # ceil((bits + 1) / 5): room for the sign bit too
    position = np.arange(int(groups.max(initial=1)))
    chars = ((x[:, None] >> (5 * position)) & 0x1F).astype(np.uint8)  # >>: arithmetic, as C's
    chars[position < (groups - 1)[:, None]] |= 0x20
    chars += 48
    return chars[position < groups[:, None]].tobytes().decode("ascii")


# What class_rles holds per run of the mask beside the mask, with room (tracemalloc in
# tests/service/test_pipeline.py measured up to ~35 at the peak): the runs' bounds and
# labels, one class's runs and counts at a time, and the strings, 1-8 characters a count.
RLE_BYTES_PER_RUN = 64


def column_runs(labels: np.ndarray, size: Sequence[int]) -> int:
    """At most how many runs the mask restored from ``labels`` (``(h, w)``, nearest) to
    ``size = (H, W)`` has, read column by column, from the labels alone, before the mask
    is made: each of the mask's columns is one of the labels' columns with rows repeated
    or left out, which adds no runs, and a run that goes on into the next column only
    merges two."""
    labels = np.asarray(labels)
    h, w = labels.shape
    changes = np.count_nonzero(labels[1:] != labels[:-1], axis=0) if h > 1 else np.zeros(w, np.int64)
    repeats = np.bincount(nearest_indices(w, int(size[1])), minlength=w)
    return int(repeats @ (changes + 1))


def class_rles(mask: np.ndarray, class_names: Sequence[str], transposed: bool = False) -> Dict[str, dict]:
    """Per class present in an ``(H, W)`` label mask, its COCO RLE ``{"size": [H, W], "counts": str}``.

    The label runs are found once, in one column-major pass; each class's binary runs
    follow from them (the gaps between its runs are its zeros), so the cost is one
    pass over the pixels plus one per run, not one pass per class; beside the mask it
    holds at most ``RLE_BYTES_PER_RUN`` a run. With ``transposed``, ``mask`` is the
    ``(W, H)`` transpose: its rows are the mask's columns, COCO's order already
    (``Segmenter.restore(labels.T, (W, H))`` makes it at once; transposing a 2048x2048
    mask here took 14.7 ms)."""
    w, h = mask.shape if transposed else mask.shape[::-1]
    flat = np.ascontiguousarray(mask if transposed else mask.T).ravel()
    n = flat.size
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    edges += 1
    bounds = np.concatenate(([0], edges, [n]))  # run i is bounds[i]:bounds[i + 1]
    del edges
    starts, ends = bounds[:-1], bounds[1:]
    values = flat[starts]
    out: Dict[str, dict] = {}
    for c in np.unique(values):
        if c >= len(class_names):
            continue
        chosen = np.flatnonzero(values == c)
        s, e = starts[chosen], ends[chosen]
        del chosen
        k, tail = len(s), int(n - e[-1])
        counts = np.empty(2 * k + (tail > 0), np.int64)
        counts[0 : 2 * k : 2] = s  # the zeros before each run: from the last run's end
        counts[2 : 2 * k : 2] -= e[:-1]
        counts[1 : 2 * k : 2] = e - s  # the run
        if tail:
            counts[-1] = tail
        del s, e
        out[class_names[int(c)]] = {"size": [int(h), int(w)], "counts": rle_string(counts)}
    return out
