"""The images the tests and the benchmarks send: synthetic shapes (what the bundled model
knows), encoded as PNG or JPEG, the same bytes every time, and the benchmarks' image sets."""

from __future__ import annotations

import io
from typing import List

__all__ = ["make_images", "IMAGE_SETS"]


def make_images(count: int = 16, size: int | tuple = 256, fmt: str = "PNG", seed: int = 0) -> List[bytes]:
    """Synthetic-shapes images (what the default model knows), encoded as PNG or JPEG;
    ``size``: a side, or (height, width)."""
    from PIL import Image

    from model.data import synthetic_sample

    shape = (size, size) if isinstance(size, int) else tuple(size)
    bodies = []
    for i in range(count):
        image = Image.fromarray(synthetic_sample(seed + 100, i, shape).image)
        buf = io.BytesIO()
        image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        bodies.append(buf.getvalue())
    return bodies


# The benchmarks' image sets: small PNGs at about the model's input size, 1 Mpx
# JPEGs, and 12 Mpx phone-camera-sized JPEGs (4032x3024: decoding and the
# full-size mask dominate). Made on the fly, the same bytes every time.
IMAGE_SETS = {
    "png256": lambda: make_images(16, 256, "PNG"),
    "jpeg1024": lambda: make_images(8, 1024, "JPEG"),
    "photo12mp": lambda: make_images(4, (3024, 4032), "JPEG"),
}
