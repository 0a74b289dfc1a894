"""Mask and confidence PNGs (model/visualize.py): written without PIL, read by every decoder."""

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from model.data import synthetic_sample
from model.visualize import grey_png_bytes, mask_png_bytes, palette, png_bytes


@pytest.mark.parametrize("shape", [(1, 1), (2, 513), (255, 256), (256, 256), (257, 300), (1024, 1024)])
def test_mask_png_reads_back_as_the_class_ids_with_the_palette(shape):
    mask = np.random.default_rng(sum(shape)).integers(0, 5, shape, dtype=np.uint8)
    image = Image.open(io.BytesIO(mask_png_bytes(mask, 5)))
    assert image.format == "PNG" and image.mode == "P" and image.size == shape[::-1]
    np.testing.assert_array_equal(np.asarray(image), mask)
    assert image.getpalette()[:15] == [v for colour in palette(5) for v in colour]


def test_grey_png_reads_back_as_the_values():
    values = np.random.default_rng(1).integers(0, 256, (300, 301), dtype=np.uint8)
    image = Image.open(io.BytesIO(grey_png_bytes(values)))
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), values)


def test_chunks_are_well_formed():
    """Every chunk's CRC is right and the stream is one zlib stream (strict decoders check both)."""
    data = mask_png_bytes(np.zeros((600, 40), np.uint8), 2)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, kinds, idat = 8, [], b""
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        assert int.from_bytes(data[at + 8 + length : at + 12 + length], "big") == zlib.crc32(kind + body)
        kinds.append(kind)
        idat += body if kind == b"IDAT" else b""
        at += 12 + length
    assert kinds == [b"IHDR", b"PLTE", b"IDAT", b"IEND"]
    raw = zlib.decompress(idat)
    assert len(raw) == 600 * 41 and raw[::41] == bytes(600)  # filter byte 0 on every row


def test_a_mask_compresses():
    """An upsampled mask (what the server sends for a large image) is far smaller than its pixels."""
    shapes = synthetic_sample(5, 0, (256, 256)).mask.astype(np.uint8)
    mask = np.kron(shapes, np.ones((4, 4), np.uint8))
    assert len(mask_png_bytes(mask, 4)) < mask.size / 50


@pytest.mark.parametrize("bad", [np.zeros((0, 4), np.uint8), np.zeros((4, 4, 3), np.uint8)])
def test_refuses_what_is_not_one_band(bad):
    with pytest.raises(ValueError):
        png_bytes(bad)
