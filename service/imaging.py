"""Bytes -> images for the server, with limits and memory known before any pixel is decoded.

Two steps, so the server can reserve memory in between:

- ``probe_image`` reads the header only: the format must be one we serve, the
  declared pixel count within ``max_pixels`` (a decompression bomb is refused
  from its header), and it says how many bytes decoding and preparing the image
  will take at their peak (``Probed.cost``: the decoded pixels in PIL's layout,
  the decoder's own buffers, mode conversion, EXIF rotation, the resize's
  intermediate image);
- ``decode_probed`` decodes: a GIF's first frame, EXIF orientation applied;
  the mode is left as decoded (``model.preprocess.prepare_image`` converts
  while it resizes, without full-size copies).

Probed for a model's input size (``target``), a JPEG larger than twice that size
is decoded smaller: libjpeg scales by 1/2, 1/4 or 1/8 while it decodes (DCT
scaling, what PIL's ``draft`` and ``thumbnail`` use), as far as the result still
covers the target on both sides. A 12 MP photo for a 256x256 model decodes at
1/8 (504x378 pixels): 4.4x faster, 1/64 of the pixels to hold, and masks that
agree with a full-size decode on 99.9-100% of the pixels (docs/performance.md, "JPEGs decoded
at a reduced size").

The common images decode faster than PIL decodes them, with the same pixels
(``decode_probed`` and ``prepare_probed`` choose, ``Probed.decoder`` says which):

- 8-bit RGB and grey JPEGs (not CMYK, not MPO) by libjpeg-turbo through
  ``simplejpeg``, scaled while decoding exactly as PIL's draft mode scales them: RGB
  when that is the model's input already, else PIL's own 4-byte layout, which PIL
  then rotates or resizes in place;
- 8-bit RGB and grey PNGs at the model's input size, unrotated, without transparency, by
  libspng (its array is then the input as it is; a PNG that must be
  rotated or resized would need a copy beside PIL's, so PIL decodes it), unless
  compressed chunks (text, an ICC profile) come before the pixels: libspng would inflate and
  keep them all, beyond what ``decode_cost`` counts, where PIL reads them within limits.
  Their pixel data is inflated by ISA-L (``isal``: twice as fast as the zlib libspng links)
  and handed to libspng as stored deflate blocks, which it copies and unfilters
  (:func:`_spng_decode`), through its own API where reachable (:mod:`service.libspng`:
  the checksums already checked are not checked again), else through ``imagecodecs``. When
  such a PNG's IHDR is followed by its pixels, its header is read from those two chunks
  without PIL (:func:`_plain_png`).

Both let Python's interpreter lock go while they decode. A file either of them
refuses is decoded by PIL, which decides as before whether it is corrupt. What
was measured against what (pyspng is faster still but holds the lock while it
decodes, which would serialise every decoding thread) is in docs/performance.md,
"Host work per image".

PIL's and libraries' own messages never reach the client: a corrupt image is
"corrupt or truncated image data", and the detail goes to the debug log.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import imagecodecs
import numpy as np
import simplejpeg
from isal import isal_zlib
from PIL import ExifTags, Image

from model.preprocess import prepare_image, to_rgb_array
from model.visualize import PNG_SIGNATURE, png_chunk

from . import libspng
from .errors import BadImage, PayloadTooLarge

__all__ = [
    "ACCEPTED_FORMATS",
    "Probed",
    "probe_image",
    "size_problem",
    "decode_probed",
    "decode_image",
    "decode_cost",
]

log = logging.getLogger("chanseg.imaging")

ACCEPTED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "MPO"}  # MPO: multi-picture JPEG
# PIL's own bomb guard only warns below 2x this; ours (max_pixels) is stricter and runs first.
Image.MAX_IMAGE_PIXELS = None

_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# The orientations that swap width and height.
_TRANSPOSING = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                Image.Transpose.ROTATE_90)  # fmt: skip
_ONE_BYTE_MODES = {"1", "L", "P"}
_TWO_BYTE_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
# Bytes per pixel the decoder itself holds beside the image, by format, measured
# as peak RSS growth (tests/service/test_imaging.py::test_decode_cost_covers_the_peak):
# libjpeg's coefficient buffer for progressive JPEGs, libwebp's and libtiff's
# whole-image buffers.
_DECODER_BYTES = {"JPEG": 1, "MPO": 1, "WEBP": 13, "TIFF": 1}
_PROGRESSIVE_JPEG_BYTES = 7
_FIXED_COST = 8 << 20
PIL, SIMPLEJPEG, SPNG = "pil", "simplejpeg", "spng"


@dataclass
class Probed:
    """An opened (header read, pixels not decoded) image and what decoding will cost."""

    image: Optional[Image.Image]  # None once decoded
    name: str
    width: int  # as displayed: after EXIF orientation
    height: int
    orientation: Optional[Image.Transpose]
    cost: int  # peak bytes to decode and prepare it
    mode: str = ""  # PIL's mode, from the header
    decoded_size: Optional[Tuple[int, int]] = (
        None  # (width, height) once decoded, as displayed; None: full size
    )
    decoder: str = PIL  # SIMPLEJPEG, SPNG or PIL: what decodes it (module docstring)
    data: bytes = b""  # the encoded file, for a decoder other than PIL
    opened: bool = True  # False: its header was read without PIL (_plain_png), which opens it if needed

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _pixel_bytes(mode: str) -> int:
    if mode in _ONE_BYTE_MODES:
        return 1
    if mode in _TWO_BYTE_MODES:
        return 2
    return 4  # PIL keeps RGB, RGBA, CMYK, LA, I and F in 4 bytes per pixel


def decode_cost(
    width: int, height: int, mode: str, fmt: str = "PNG", rotated: bool = False,
    progressive: bool = False, transparent: bool = False, target: Sequence[int] = (256, 256),
    decoded_size: Optional[Tuple[int, int]] = None,
) -> int:  # fmt: skip
    """Peak bytes to decode a ``width`` x ``height`` image of ``mode`` and resize
    it to ``target = (h, w)`` with :func:`model.preprocess.prepare_image`.
    ``decoded_size``: the (width, height) a JPEG decodes to when scaled while
    decoding; a progressive one still holds the coefficients of the full size."""
    coefficients = width * height * _PROGRESSIVE_JPEG_BYTES if fmt in ("JPEG", "MPO") and progressive else 0
    if decoded_size is not None:
        width, height = decoded_size
    pixels = width * height
    decoded = _pixel_bytes(mode)
    per_pixel = decoded + _DECODER_BYTES.get(fmt, 0)
    if rotated:
        per_pixel += decoded  # the transposed copy beside the original
    if mode in ("RGB", "L"):
        converted = decoded
    elif mode in _TWO_BYTE_MODES or mode == "I":
        converted = 1
        per_pixel += decoded + 4  # the array of the samples, strips of wider integers, the 8-bit result
    elif mode == "RGBA":
        converted = 4
        per_pixel += 4  # the RGB image the alpha is composited into
    elif mode in ("LA", "PA") or (mode == "P" and transparent):
        converted = 4
        per_pixel += 8  # an RGBA copy, then the RGB result
    else:
        converted = 4
        per_pixel += 4  # convert("RGB")
    # The resize's two passes meet in an intermediate image; PIL runs the pass
    # that leaves the smaller one first (measured on 8x400000 and 300x200000 images).
    th, tw = int(target[0]), int(target[1])
    intermediate = min(tw * height, width * th) * converted
    # PIL keeps a pointer and some bookkeeping per row, and the resize a table of
    # filter coefficients per source column and row: visible in tall and wide strips.
    return (
        coefficients + pixels * per_pixel + intermediate + 64 * height + 32 * (width + height) + _FIXED_COST
    )


def _bad(name: str, what: str, exc: BaseException) -> BadImage:
    log.debug("%s: %s (%s: %s)", name, what, type(exc).__name__, exc)
    return BadImage(f"{name}: {what}")


def size_problem(width: int, height: int, max_pixels: int, min_side: int) -> Optional[tuple]:
    """The image-size limits (MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE), checked in one place for
    every input: None when ``width`` x ``height`` is acceptable, else ``(too_large, message)``."""
    if width * height > max_pixels:
        return True, f"{width}x{height} pixels is over the limit of {max_pixels} pixels"
    if width < min_side or height < min_side:
        return False, f"{width}x{height} is too small; the smallest accepted is {min_side}x{min_side}"
    return None


def probe_image(
    data: bytes,
    max_pixels: int,
    min_side: int = 1,
    name: str = "image",
    target: Optional[Sequence[int]] = None,
) -> Probed:
    """Read an encoded image's header (no pixels are decoded). With ``target``
    (``(h, w)``, what :func:`prepare_probed` will resize to), the cost includes the
    resize, and a large JPEG is set to decode at a reduced size.

    Raises:
        BadImage: empty, unreadable header, unsupported format, too small.
        PayloadTooLarge: more than ``max_pixels`` pixels declared in the header.
    """
    if not data:
        raise BadImage(f"{name}: empty")
    plain = _plain_png(data, name, max_pixels, min_side, target)
    if plain is not None:
        return plain
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        fmt, (width, height), mode = image.format, image.size, image.mode
    except Exception as exc:  # PIL's plugins raise all kinds of exceptions on crafted headers
        raise _bad(name, "not a decodable image (PNG, JPEG, WebP, BMP, TIFF or GIF)", exc) from None
    if fmt not in ACCEPTED_FORMATS:
        image.close()
        raise BadImage(f"{name}: unsupported image format {fmt}")
    problem = size_problem(width, height, max_pixels, min_side)
    if problem is not None:
        image.close()
        too_large, message = problem
        raise (PayloadTooLarge if too_large else BadImage)(f"{name}: {message}")
    try:
        # The base class's getexif reads what the header holds; PNG's own would decode
        # the whole image to look for a late eXIf chunk. Orientation is what is known now.
        orientation = _ORIENTATION.get(Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1))
    except Exception as exc:
        log.debug("%s: unreadable EXIF ignored (%s)", name, exc)
        orientation = None
    transposed = orientation in _TRANSPOSING
    if transposed:
        width, height = height, width
    decoded_size = None
    if target is not None and fmt in ("JPEG", "MPO"):
        th, tw = int(target[0]), int(target[1])
        full = image.size
        image.draft(None, (th, tw) if transposed else (tw, th))  # sizes in the file's own orientation
        if image.size != full:
            decoded_size = image.size[::-1] if transposed else image.size
    cost = decode_cost(
        width, height, mode, fmt, rotated=orientation is not None,
        progressive=bool(image.info.get("progressive") or image.info.get("progression")),
        transparent="transparency" in image.info, target=target or (256, 256), decoded_size=decoded_size,
    )  # fmt: skip
    decoder = _fast_decoder(fmt, mode, data, image.info, image.size)
    if decoder == SPNG and (orientation is not None or target is None or (height, width) != tuple(target)):
        # libspng's array would be copied into PIL's layout to be rotated or resized: 7 bytes
        # a pixel at the peak against PIL's 4 (the memory test's peak grew ~6%). PIL it is.
        decoder = PIL
    elif decoder == SIMPLEJPEG:
        w, h = decoded_size or (width, height)
        cost += w * h  # its working buffers: measured ~0.8 bytes per decoded pixel above PIL's
    elif decoder == SPNG:
        cost += _scanline_bytes(data)  # the inflated scanlines, beside the stream made of them
    return Probed(image, name, width, height, orientation, cost, mode, decoded_size, decoder, data)


def _plain_png(
    data: bytes, name: str, max_pixels: int, min_side: int, target: Optional[Sequence[int]]
) -> Optional[Probed]:
    """The probe of a PNG that libspng will decode as it is, read from its first two
    chunks without PIL (a third of the probe's time; docs/performance.md, "Host work per
    image"), or None for :func:`probe_image` to read it as any other file. Taken: an 8-bit
    RGB or grey, non-interlaced PNG at the model's input size whose IHDR (checksum right, as
    PIL checks it) is followed by its first IDAT, within the size limits: what PIL reads
    the same (no EXIF, no transparency, no text), to the same answer, libspng's decoder.
    Should libspng refuse its pixels, PIL opens it then and decides (:func:`decode_probed`)."""
    if (
        target is None
        or data[:16] != PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR"
        or data[37:41] != b"IDAT"
        or data[24] != 8
        or data[25] not in (0, 2)
        or data[26:29] != b"\x00\x00\x00"  # deflate, adaptive filters, not interlaced
        or isal_zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big")
    ):
        return None
    width, height, _ = _ihdr(data)
    if (height, width) != (int(target[0]), int(target[1])) or size_problem(
        width, height, max_pixels, min_side
    ):
        return None  # PIL resizes it (or the probe refuses it), as for any other file
    mode = "RGB" if data[25] == 2 else "L"
    cost = decode_cost(width, height, mode, "PNG", target=target) + _scanline_bytes(data)
    return Probed(None, name, width, height, None, cost, mode, None, SPNG, data, opened=False)


def _fast_decoder(fmt: str, mode: str, data: bytes, info: dict, size: Tuple[int, int]) -> str:
    """Which decoder takes an image PIL has read the header of, at ``size`` (width, height)
    (module docstring)."""
    if mode not in ("RGB", "L"):
        return PIL
    if fmt == "JPEG":
        return SIMPLEJPEG
    # IHDR is the first chunk: its size at bytes 16-23, bit depth at 24, colour type (0 grey,
    # 2 RGB) at 25. PIL reads the last IHDR of a file that has two, libspng the first: a file
    # whose first IHDR is not the size PIL read (and the limits checked) is PIL's.
    if (
        fmt == "PNG"
        and data[12:16] == b"IHDR"
        and _ihdr(data)[:2] == tuple(size)
        and data[24] == 8
        and data[25] in (0, 2)
        and "transparency" not in info
        and _plain_before_idat(data)
    ):
        return SPNG
    return PIL


# Chunks libspng inflates and keeps while it decodes (it sets no limit on them): a file of
# many small compressed texts would hold far more than ``decode_cost`` counts. PIL reads them
# within its own limits, so such a file goes to PIL.
_INFLATED_CHUNKS = (b"zTXt", b"iTXt", b"iCCP")
_MAX_CHUNKS_BEFORE_IDAT = 32


def _png_chunks(data: bytes) -> Iterator[Tuple[bytes, int, int]]:
    """``(kind, start, end)`` of each chunk's data in a PNG file, in order, as far as a
    chunk's header is in the file (its data and CRC may not be)."""
    at = 8
    while at + 8 <= len(data):
        start = at + 8
        end = start + int.from_bytes(data[at : at + 4], "big")
        yield data[at + 4 : start], start, end
        at = end + 4


def _plain_before_idat(data: bytes) -> bool:
    """Whether a PNG reaches its first IDAT within a few chunks, none of them compressed."""
    for _, (kind, _, _) in zip(range(_MAX_CHUNKS_BEFORE_IDAT), _png_chunks(data)):
        if kind == b"IDAT":
            return True
        if kind in _INFLATED_CHUNKS:
            return False
    return False


def decode_probed(probed: Probed) -> Image.Image:
    """Decode a probed image: first frame, EXIF orientation applied, mode as decoded.

    The probe gives its image up: the decoded pixels live only as long as the
    caller holds them, not as long as the probe does.

    Raises:
        BadImage: corrupt or truncated pixel data.
    """
    image, probed.image = probed.image, None
    if image is None and probed.opened:
        raise RuntimeError(f"{probed.name}: already decoded")
    try:
        if image is None:  # its header was read without PIL (_plain_png): PIL opens it now
            probed.opened = True
            image = Image.open(io.BytesIO(probed.data))
        image.seek(0)  # first frame of an animation
        image.load()
        if probed.orientation is not None:
            image = image.transpose(probed.orientation)
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise _bad(probed.name, "corrupt or truncated image data", exc) from None
    if image.size != (
        probed.decoded_size or (probed.width, probed.height)
    ):  # a decoder that disagrees with its header
        raise BadImage(f"{probed.name}: corrupt image (its size changed while decoding)")
    return image


def decode_image(data: bytes, max_pixels: int, min_side: int = 1, name: str = "image") -> np.ndarray:
    """Encoded image bytes -> ``(H, W, 3)`` uint8 RGB array (for tools and tests;
    the server keeps the PIL image and resizes it without this full-size copy)."""
    image = decode_probed(probe_image(data, max_pixels, min_side, name))
    try:
        return np.array(to_rgb_array(image))
    except Exception as exc:
        raise _bad(name, "corrupt or truncated image data", exc) from None


def prepare_probed(probed: Probed, size: Sequence[int]) -> np.ndarray:
    """Decode and resize to ``size = (h, w)`` in one go: ``(h, w, 3)`` uint8."""
    h, w = int(size[0]), int(size[1])
    pixels = _decode_fast(probed, (h, w))
    if pixels is not None:
        if probed.orientation is None and pixels.shape[:2] == (h, w):  # at the size wanted: no PIL at all
            return (
                np.ascontiguousarray(pixels[..., :3])
                if pixels.ndim == 3
                else np.repeat(pixels[..., None], 3, 2)
            )
        image = _as_pil(pixels)
        del pixels  # PIL's image holds libjpeg-turbo's pixels now, in place
        if probed.orientation is not None:
            image = image.transpose(probed.orientation)
        if image.mode == "RGBX":  # resized as RGBX, then made RGB: the same pixels, no full-size copy
            small = image.resize((w, h), Image.Resampling.BILINEAR) if image.size != (w, h) else image
            return np.array(small.convert("RGB"))
    else:
        image = decode_probed(probed)
    try:
        return prepare_image(image, size)
    except Exception as exc:
        raise _bad(probed.name, "corrupt or truncated image data", exc) from None


def _decode_fast(probed: Probed, size: Tuple[int, int]) -> Optional[np.ndarray]:
    """The pixels by libjpeg-turbo or libspng (RGB or grey; a JPEG that PIL will rotate or
    resize to ``size`` as RGBX, PIL's own layout), in the file's own orientation; None when
    PIL is to decode it (``probed.decoder``, or a fast decoder refused the file or disagreed
    with its header: PIL decides then)."""
    if probed.decoder == PIL:
        return None
    width, height = probed.decoded_size or (probed.width, probed.height)
    final = probed.orientation is None and (height, width) == tuple(size)
    if probed.orientation in _TRANSPOSING:
        width, height = height, width  # the file's own orientation
    try:
        if probed.decoder == SIMPLEJPEG:
            # RGB when these are the pixels the model gets: RGBX would cost a strided copy
            # (0.28 ms at 256x256); else RGBX, which PIL then uses in place.
            colours = "GRAY" if probed.mode != "RGB" else "RGB" if final else "RGBX"
            pixels = simplejpeg.decode_jpeg(probed.data, colours, min_height=height, min_width=width)
        else:
            pixels = _spng_decode(probed.data)
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[..., 0]
    except Exception as exc:  # corrupt, truncated, or only a warning libjpeg-turbo would raise for
        log.debug(
            "%s: %s declined it (%s: %s); PIL decodes it",
            probed.name,
            probed.decoder,
            type(exc).__name__,
            exc,
        )
        return None
    if pixels.shape[:2] != (height, width) or pixels.dtype != np.uint8:
        log.debug(
            "%s: %s decoded %s, not %dx%d; PIL decodes it",
            probed.name,
            probed.decoder,
            pixels.shape,
            width,
            height,
        )
        return None
    probed.image, probed.data = None, b""  # the decoded pixels are what is held now
    return pixels


def _as_pil(pixels: np.ndarray) -> Image.Image:
    """libjpeg-turbo's RGBX or grey pixels as a PIL image, in place (no copy)."""
    h, w = pixels.shape[:2]
    if pixels.ndim == 2:
        return Image.frombuffer("L", (w, h), pixels, "raw", "L", 0, 1)
    return Image.frombuffer("RGBX", (w, h), pixels, "raw", "RGBX", 0, 1)


# A PNG's pixel data inflated by ISA-L, then read by libspng as stored (uncompressed) deflate
# blocks: libspng inflates with the zlib the system has, at half ISA-L's speed (the benchmark's
# 256x256 PNGs: their pixel data inflated by zlib in 0.65 ms, by ISA-L in 0.31; the whole decode
# 0.84 -> 0.56 ms). The pixels are libspng's own either way. A file this path does not take as it
# is (interlaced, a chunk's CRC wrong, a stream that is not exactly the image's scanlines) is
# decoded by libspng as before, which refuses it or not, and then PIL decides. ISA-L reads a few
# streams zlib calls invalid (a Huffman code that does not fill its lengths): those decode to
# what their codes say rather than being refused.
_MAX_IDAT_CHUNKS = 4096  # encoders write 8-64 KiB each: a 3 MB PNG in ~400
_STORED_BLOCK = 65535


def _ihdr(data: bytes) -> Tuple[int, int, int]:
    """(width, height, channels) of an 8-bit grey or RGB PNG, from its first chunk's IHDR."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), 3 if data[25] == 2 else 1


def _scanline_bytes(data: bytes) -> int:
    """The bytes of an 8-bit grey or RGB PNG's scanlines (its filter byte first), from IHDR."""
    width, height, channels = _ihdr(data)
    return height * (1 + width * channels)


def _spng_decode(data: bytes) -> np.ndarray:
    """An 8-bit grey or RGB PNG (``_fast_decoder`` checked its IHDR) by libspng, its pixel
    data inflated by ISA-L (see above); through libspng's own API without its checksums
    checked again where it is reachable (:mod:`service.libspng`)."""
    unchecked = libspng.decode_unchecked
    stored = _stored_png(data, checksums=unchecked is None)
    if stored is None:
        return imagecodecs.spng_decode(data)
    if unchecked is None:
        return imagecodecs.spng_decode(stored)
    width, height, channels = _ihdr(data)
    return unchecked(stored, height, width, channels)


def _idat_pieces(data: bytes) -> Optional[List[memoryview]]:
    """The contents of a PNG's IDAT chunks, in place, each one's CRC checked (libspng checks
    them too); None if one is wrong or cut short, or there are none or too many."""
    view, pieces, idat_crc = memoryview(data), [], isal_zlib.crc32(b"IDAT")
    for kind, start, end in _png_chunks(data):
        if kind != b"IDAT":
            if pieces:
                break  # the pixel data ends at the first other chunk after it, as for PIL
            continue
        if end + 4 > len(data) or len(pieces) == _MAX_IDAT_CHUNKS:
            return None
        if isal_zlib.crc32(view[start:end], idat_crc) != int.from_bytes(data[end : end + 4], "big"):
            return None
        pieces.append(view[start:end])
    return pieces or None


def _stored_png(data: bytes, checksums: bool = True) -> Optional[bytes]:
    """The same PNG with its scanlines in stored deflate blocks and no ancillary chunks,
    or None when it is not taken as it is. Beside the file it holds the scanlines once, in
    pieces, then the new file: never the compressed stream copied. Without ``checksums``
    the new IDAT's CRC and the stream's Adler-32 are zeros, for a decoder told not to read
    them (:mod:`service.libspng`): the file's own were checked on the way."""
    if data[28] != 0:  # interlaced
        return None
    pieces = _idat_pieces(data)
    if pieces is None:
        return None
    head = b""
    for piece in pieces:  # the stream's first two bytes, across IDATs however short
        head += bytes(piece[: 2 - len(head)])
        if len(head) == 2:
            break
    if len(head) < 2 or head[0] & 0x0F != 8 or head[0] >> 4 > 7:  # deflate, a window of at most 32 KiB
        return None  # as zlib refuses it (ISA-L would read a larger window's stream)
    chunks = _inflated(pieces, _scanline_bytes(data))
    if chunks is None:
        return None
    blocks = [
        view[at : at + _STORED_BLOCK]
        for view in map(memoryview, chunks)
        for at in range(0, len(view), _STORED_BLOCK)
    ]
    parts, adler = [b"\x78\x01"], 1  # a zlib header: deflate, 32 KiB window
    for i, block in enumerate(blocks):  # stored blocks: BFINAL, BTYPE 00; LEN, NLEN; the bytes
        final = i == len(blocks) - 1
        parts += [
            bytes([final]) + len(block).to_bytes(2, "little") + (len(block) ^ 0xFFFF).to_bytes(2, "little"),
            block,
        ]
        if checksums:
            adler = isal_zlib.adler32(block, adler)
    parts.append(adler.to_bytes(4, "big") if checksums else bytes(4))
    if checksums:
        idat = png_chunk(b"IDAT", parts)
    else:
        idat = [sum(map(len, parts)).to_bytes(4, "big"), b"IDAT", *parts, bytes(4)]
    return b"".join([PNG_SIGNATURE, data[8:33], *idat, *png_chunk(b"IEND", [])])


def _inflated(pieces: List[memoryview], expected: int) -> Optional[List[bytes]]:
    """The zlib stream cut into ``pieces``, inflated by ISA-L, one call per piece (each
    call lets the interpreter lock go and takes it back: under load, a thread switch);
    None unless it is exactly ``expected`` bytes, ends, and nothing follows it. Never
    inflated further than one byte past ``expected``."""
    inflate, chunks, produced = isal_zlib.decompressobj(), [], 0
    try:
        for piece in (*pieces, b""):  # the empty one: what ISA-L still holds once the input is in
            pending = piece
            while not inflate.eof:
                chunk = inflate.decompress(pending, expected - produced + 1)  # 0 would be "no limit"
                pending = inflate.unconsumed_tail
                if not chunk:
                    if pending:
                        return None  # no progress: not a stream zlib would read either
                    break
                produced += len(chunk)
                if produced > expected:
                    return None
                chunks.append(chunk)
            if pending:
                return None  # bytes after the stream
    except isal_zlib.error:
        return None
    if produced != expected or not inflate.eof or inflate.unused_data:
        return None
    return chunks
