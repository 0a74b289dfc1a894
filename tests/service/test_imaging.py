"""decode_image: formats, modes, orientation, and limits checked from the header."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.errors import BadImage, PayloadTooLarge
from service.imaging import decode_image
from tests.service.conftest import png_bytes, random_image

BIG = 10**9


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_formats(fmt):
    image = Image.fromarray(random_image(0, 30, 20))
    out = decode_image(encode(image, fmt), BIG)
    assert out.shape == (30, 20, 3) and out.dtype == np.uint8


def test_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(data, BIG)
    assert tuple(out[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (12, 10), 128),
        Image.new("RGBA", (12, 10), (10, 20, 30, 255)),
        Image.new("RGB", (12, 10), (40, 50, 60)).convert("P"),
        Image.new("CMYK", (12, 10), (0, 0, 0, 0)),
    ],
    ids=["grey", "rgba", "palette", "cmyk"],
)
def test_modes_become_rgb(image):
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    out = decode_image(encode(image, fmt), BIG)
    assert out.shape == (10, 12, 3)
    if image.mode == "CMYK":
        assert out.mean() > 240  # no ink = white


def test_16_bit_grey_scales_instead_of_clipping():
    data = np.full((8, 8), 32768, dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(data), "PNG"), BIG)
    assert 126 <= out[0, 0, 0] <= 129


def test_exif_orientation_applied():
    image = Image.fromarray(random_image(1, 20, 40))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(image, "JPEG", exif=exif.tobytes()), BIG)
    assert out.shape == (40, 20, 3)


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_from_header():
    data = _png_claiming(50000, 50000)
    assert len(data) < 100
    with pytest.raises(PayloadTooLarge, match="50000x50000"):
        decode_image(data, 40_000_000)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, I am text", "not a decodable image"),
        (png_bytes(random_image(2))[:60], "corrupt"),
    ],
    ids=["empty", "text", "truncated"],
)
def test_bad_bytes(data, message):
    with pytest.raises(BadImage, match=message):
        decode_image(data, BIG)


def test_too_small():
    with pytest.raises(BadImage, match="1x1 is too small"):
        decode_image(png_bytes(random_image(3, 1, 1)), BIG, min_side=8)


def test_unsupported_format():
    with pytest.raises(BadImage, match="unsupported image format"):
        decode_image(encode(Image.new("RGB", (8, 8)), "PPM"), BIG)
