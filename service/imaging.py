"""Bytes <-> images for the server, with limits checked before any pixel is decoded.

``decode_image`` reads the header first: the format must be one we serve and
the declared pixel count within ``max_pixels`` (a decompression bomb is refused
from its header), then decodes, takes a GIF's first frame, applies EXIF
orientation and converts any mode (grey, 16-bit, palette, RGBA, CMYK) to RGB.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.preprocess import to_rgb_array

from .errors import BadImage, PayloadTooLarge

__all__ = ["ACCEPTED_FORMATS", "decode_image"]

ACCEPTED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "MPO"}  # MPO: multi-picture JPEG
# PIL's own bomb guard only warns below 2x this; ours (max_pixels) is stricter and runs first.
Image.MAX_IMAGE_PIXELS = None


def decode_image(data: bytes, max_pixels: int, min_side: int = 1, name: str = "image") -> np.ndarray:
    """Encoded image bytes -> ``(H, W, 3)`` uint8 RGB array.

    Raises:
        BadImage: empty, undecodable, truncated, unsupported format, too small.
        PayloadTooLarge: more than ``max_pixels`` pixels declared in the header.
    """
    if not data:
        raise BadImage(f"{name}: empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage(f"{name}: not a decodable image (PNG, JPEG, WebP, BMP, TIFF or GIF)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"{name}: corrupt image header ({exc})") from None
    with image:
        if image.format not in ACCEPTED_FORMATS:
            raise BadImage(f"{name}: unsupported image format {image.format}")
        width, height = image.size
        if width * height > max_pixels:
            raise PayloadTooLarge(f"{name}: {width}x{height} pixels is over the limit of {max_pixels} pixels")
        if width < min_side or height < min_side:
            raise BadImage(
                f"{name}: {width}x{height} is too small; the smallest accepted is {min_side}x{min_side}"
            )
        try:
            image.seek(0)  # first frame of an animation
            image.load()
            image = ImageOps.exif_transpose(image)
            return np.array(to_rgb_array(image))
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise BadImage(f"{name}: corrupt or truncated image data ({exc})") from None
