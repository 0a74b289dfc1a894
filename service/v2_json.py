"""A v2 request's JSON, read without holding Python's interpreter lock for long: the large
numeric ``data`` arrays of its inputs (an image is 196,608 numbers at 256x256, 3,145,728 at
1024x1024) are cut out of the text and read by numpy, which lets the lock go while it
parses; the rest, small, by orjson.

Why: every JSON parser that builds Python objects holds the lock throughout. orjson reads
a flat list of 3 M integers in ~85 ms here, a nested one (``image.tolist()``) in ~530 ms,
and making an array of the list takes 70-200 ms more: the event loop (``/healthz``) waits
that long per request in flight. ``np.fromstring(text, sep=",")`` parses ~18 ns per
integer with the lock released, and the cutting and checking here are a few bytes
operations of at most :data:`_PIECE` bytes each, between which the loop runs.

:func:`loads` is ``orjson.loads`` with each input's large numeric ``data`` left as a
:class:`Numbers` (its text); :meth:`Numbers.array` reads it, checking what a JSON parser
and ``np.asarray`` would: the brackets nest regularly as the tensor's shape (flat, or
nested as all of it), no value is missing, each value is a number. It is a little more
lenient than JSON in the numbers it reads (``+1``, ``01``, as C's ``strtod`` reads them).
"""

from __future__ import annotations

import math
import uuid
import warnings
from typing import Any, List, Sequence, Tuple

import numpy as np
import orjson

__all__ = ["loads", "Numbers", "MIN_CUT", "MAX_PARSED_VALUES", "TooManyValues"]

MIN_CUT = 64 << 10  # a data array shorter than this is left to orjson
# Values orjson may parse in one request (what is not cut out): it holds the lock
# throughout, ~10 ms for this many here; more went in a long data array, or is refused.
MAX_PARSED_VALUES = 1 << 17
_PIECE = 1 << 20  # bytes per bytes operation: each holds the lock for about a millisecond
_FIRST_PIECE = 4 << 10  # where an array ends is looked for in pieces growing from this
_NUMERIC = b"0123456789.eE+-"
_SPACE = b" \t\r\n"
_ALPHABET = _NUMERIC + _SPACE + b",[]"  # what a numeric array's text is made of
_BRACKETS_TO_SPACES = bytes.maketrans(b"[]", b"  ")
# np.fromstring warns when it stops early; the count says so (Numbers.array).
warnings.filterwarnings("ignore", "string or file could not be read to its end", DeprecationWarning)


class TooManyValues(ValueError):
    """More values outside the inputs' data than :data:`MAX_PARSED_VALUES`."""


class Numbers:
    """The text of one input's numeric ``data`` array (``[...]``, brackets included)."""

    __slots__ = ("text",)

    def __init__(self, text: bytes) -> None:
        self.text = text

    def array(self, name: str, shape: Sequence[int], integers: bool) -> np.ndarray:
        """The values, flat (int64 for ``integers``, else float64); ``ValueError`` naming
        ``name`` when the text is not a flat or fully nested list of ``prod(shape)`` numbers."""
        count = math.prod(shape)
        shape = list(shape) or [count]
        skeleton = _pieces(self.text, lambda piece: piece.translate(None, _NUMERIC + _SPACE))
        # Built only at the skeleton's own length (a shape of many 1s would make a nested
        # skeleton far longer than any text): so never longer than the request.
        if not any(
            _skeleton_length(s) == len(skeleton) and skeleton == _skeleton(s) for s in ([count], shape)
        ):
            raise ValueError(
                f"input '{name}': 'data' must be a flat list of {count} numbers, or nested as the shape {list(shape)}"
            )
        # Needed, not only for the message: np.fromstring reads an empty value between
        # separators and spaces ("1, ,1") as 0.
        squeezed = _pieces(self.text, lambda piece: piece.translate(None, _SPACE))
        if any(gap in squeezed for gap in (b",,", b"[,", b",]", b"[]")):
            raise ValueError(f"input '{name}': 'data' has an empty value")
        del squeezed
        numbers = _pieces(self.text, lambda piece: piece.translate(_BRACKETS_TO_SPACES))
        text = self.text  # searched a piece at a time, as everything here
        fractions = any(
            text.find(c, at, at + _PIECE) >= 0 for at in range(0, len(text), _PIECE) for c in b".eE"
        )
        try:  # the lock is let go while it parses; it stops at the first word that is not a number
            values = np.fromstring(
                numbers, dtype=np.int64 if integers and not fractions else np.float64, sep=","
            )
        except (DeprecationWarning, ValueError):  # that stop, where warnings are errors
            values = np.empty(0)
        if values.size != count:
            raise ValueError(f"input '{name}': 'data' holds something that is not a number")
        return values


def _pieces(text: bytes, fn) -> bytes:
    """``fn`` over ``text`` a piece at a time (byte-wise operations only), joined."""
    if len(text) <= _PIECE:
        return fn(text)
    return b"".join(fn(text[i : i + _PIECE]) for i in range(0, len(text), _PIECE))


def _skeleton_length(shape: List[int]) -> int:
    """``len(_skeleton(shape))``, without making it: per level, two brackets and the
    commas between the items of each list."""
    total, lists = 0, 1
    for size in shape:
        total += lists * (2 + max(0, size - 1))
        lists *= size
    return total


def _skeleton(shape: List[int]) -> bytes:
    """The brackets and commas of a list nested as ``shape``, without the values."""
    inner = b"[" + b"," * max(0, shape[-1] - 1) + b"]"
    for size in reversed(shape[:-1]):
        inner = b"[" + b",".join([inner] * size) + b"]" if size else b"[]"
    return inner


def _first_outside(text: bytes, start: int) -> int:
    """The index of the first byte at or after ``start`` that no numeric array holds;
    the pieces looked at grow from :data:`_FIRST_PIECE`, so a short array costs little
    however many there are."""
    at, size = start, _FIRST_PIECE
    while at < len(text):
        piece = text[at : at + size]
        others = piece.translate(None, _ALPHABET)
        if others:
            return at + piece.index(others[:1])
        at, size = at + size, min(2 * size, _PIECE)
    return len(text)


def _cut(text: bytes) -> Tuple[bytes, List[bytes], str]:
    """``text`` with each long numeric ``"data": [...]`` replaced by a string naming it."""
    marker = "\x00" + uuid.uuid4().hex + ":"
    parts: List[bytes] = []
    cut: List[bytes] = []
    kept = found = 0
    while True:
        found = text.find(b'"data"', found)
        if found < 0:
            break
        at = found + 6
        if found and text[found - 1 : found] == b"\\":  # inside a string
            found = at
            continue
        while text[at : at + 1] in (b" ", b"\t", b"\r", b"\n"):
            at += 1
        if text[at : at + 1] != b":":
            found = at
            continue
        at += 1
        while text[at : at + 1] in (b" ", b"\t", b"\r", b"\n"):
            at += 1
        if text[at : at + 1] != b"[":
            found = at
            continue
        end = _first_outside(text, at)
        array = text[at:end].rstrip()
        if array.endswith(b","):  # the next key's comma
            array = array[:-1].rstrip()
        if len(array) < MIN_CUT:
            found = at
            continue
        parts += [text[kept:at], orjson.dumps(marker + str(len(cut)))]
        cut.append(array)
        kept = found = at + len(array)
    if not cut:
        return text, cut, marker
    parts.append(text[kept:])
    return b"".join(parts), cut, marker


def loads(text: bytes) -> Any:
    """The document, each input's long numeric ``data`` a :class:`Numbers`. ``ValueError``
    (orjson's ``JSONDecodeError`` is one) for text that is not JSON."""
    short, cut, marker = _cut(text)
    # At most (commas also separate keys, and sit in strings); a piece at a time.
    values = 1 + sum(short.count(b",", at, at + _PIECE) for at in range(0, len(short), _PIECE))
    if values > MAX_PARSED_VALUES:
        raise TooManyValues(
            f"the JSON holds up to {values} values outside its inputs' numeric data, over the limit of "
            f"{MAX_PARSED_VALUES}: numbers of a tensor go in an input's 'data' (or in binary)"
        )
    doc = orjson.loads(short)
    if not cut:
        return doc
    used = 0
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    for item in inputs if isinstance(inputs, list) else []:
        data = item.get("data") if isinstance(item, dict) else None
        if isinstance(data, str) and data.startswith(marker):
            item["data"] = Numbers(cut[int(data[len(marker) :])])
            used += 1
    if used != len(cut):
        raise ValueError("a long numeric 'data' array outside an input's data")
    return doc
