"""Masks as pictures: a class palette, palette PNGs and colour overlays.

Mask and confidence PNGs are written here, not by PIL: 8-bit, no row filter,
deflated by ISA-L (``isal``) at level 1. A server writes one per image it answers;
measured in one run on this project's 256x256 masks, PIL's encoder at zlib level 1
took 0.141 ms and this 0.020 ms (1.67 KB against PIL's 1.79 KB), and on a
1024x1024 mask upsampled from 256x256 1.70 ms against 0.164 ms (8.5 KB against
4.4 KB). Any PNG decoder reads them: pixel value = class id.
"""

from __future__ import annotations

import functools
import struct
from typing import List, Sequence, Tuple

import numpy as np
from isal import isal_zlib
from PIL import Image

__all__ = ["palette", "mask_to_image", "mask_png_bytes", "grey_png_bytes", "png_chunk", "overlay"]

_BASE = [
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
    (70, 240, 240), (245, 130, 48), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128),
]  # fmt: skip


def palette(num_classes: int) -> List[tuple]:
    """One RGB colour per class; class 0 (background) is black."""
    return list(_palette(num_classes))


@functools.lru_cache(maxsize=64)
def _palette(num_classes: int) -> Tuple[tuple, ...]:
    # Made once per class count: a random generator costs ~8 us, more than a small mask's PNG.
    colours = list(_BASE)
    rng = np.random.default_rng(0)
    while len(colours) < num_classes:
        colours.append(tuple(int(v) for v in rng.integers(0, 256, 3)))
    return tuple(colours[:num_classes])


@functools.lru_cache(maxsize=64)
def _palette_bytes(num_classes: int) -> bytes:
    return bytes(v for colour in _palette(num_classes) for v in colour)


def mask_to_image(mask: np.ndarray, num_classes: int) -> Image.Image:
    """``(H, W)`` uint8 class ids -> palette ("P") image; pixel value = class id."""
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    flat = [v for colour in palette(max(num_classes, 1)) for v in colour]
    image.putpalette(flat)
    return image


def mask_png_bytes(mask: np.ndarray, num_classes: int) -> bytes:
    """The ``(H, W)`` uint8 mask as an 8-bit palette PNG: pixel value = class id,
    the colours of :func:`palette`."""
    return png_bytes(mask, _palette_bytes(max(num_classes, 1)))


def grey_png_bytes(values: np.ndarray) -> bytes:
    """An ``(H, W)`` uint8 array as an 8-bit greyscale PNG (a confidence map)."""
    return png_bytes(values)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ROWS_AT_ONCE = 256  # rows copied beside the mask at a time, with their filter bytes


def png_bytes(pixels: np.ndarray, palette_rgb: bytes = b"") -> bytes:
    """An ``(H, W)`` uint8 array as an 8-bit PNG: palette colour type with the RGB
    triples of ``palette_rgb``, or greyscale without. Rows unfiltered, deflated by
    ISA-L at level 1; beside the array it holds at most 256 rows and the output."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"expected an (H, W) array, got shape {pixels.shape}")
    h, w = pixels.shape
    if h < 1 or w < 1:
        raise ValueError(f"a PNG has at least one pixel, got {w}x{h}")
    header = struct.pack(">IIBBBBB", w, h, 8, 3 if palette_rgb else 0, 0, 0, 0)
    deflate = isal_zlib.compressobj(1)
    parts = []
    rows = np.zeros((min(h, _ROWS_AT_ONCE), w + 1), np.uint8)  # column 0: filter type 0 (none)
    for start in range(0, h, _ROWS_AT_ONCE):
        block = pixels[start : start + _ROWS_AT_ONCE]
        rows[: len(block), 1:] = block  # casts to uint8 as it copies
        parts.append(deflate.compress(rows[: len(block)]))
    parts.append(deflate.flush())
    return b"".join(
        [PNG_SIGNATURE, *png_chunk(b"IHDR", [header]), *(png_chunk(b"PLTE", [palette_rgb]) if palette_rgb else []),
         *png_chunk(b"IDAT", parts), *png_chunk(b"IEND", [])]
    )  # fmt: skip


def png_chunk(kind: bytes, parts: Sequence[bytes]) -> List[bytes]:
    """A PNG chunk whose data is ``parts`` joined, as pieces for the caller to join once
    with the rest of the file: its length, ``kind``, the parts, its CRC."""
    crc = isal_zlib.crc32(kind)
    for part in parts:
        crc = isal_zlib.crc32(part, crc)
    return [struct.pack(">I", sum(len(part) for part in parts)), kind, *parts, struct.pack(">I", crc)]


def overlay(
    image: Image.Image | np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.5
) -> Image.Image:
    """The image with non-background classes tinted in their palette colours."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    colours = np.asarray(palette(num_classes), dtype=np.float32)[mask]
    tint = (mask > 0)[..., None]
    out = np.where(tint, rgb * (1 - alpha) + colours * alpha, rgb)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))
