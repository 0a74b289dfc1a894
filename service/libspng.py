"""libspng's own C API, for the PNGs :mod:`service.imaging` builds itself: decoded
without checking again what was checked on the way in.

A plain PNG's pixel data is inflated by ISA-L and handed to libspng as the same PNG with
its scanlines in stored deflate blocks (``imaging._stored_png``). By then the file's IHDR
checksum has been checked (by PIL or ``imaging._plain_png``, reading the header), each IDAT's
(``imaging._idat_pieces``)
and the stream's Adler-32 (ISA-L, inflating it). imagecodecs' ``spng_decode`` has libspng
check the new file's chunk checksums and Adler-32 once more, with the system zlib: 0.12 ms
of the 0.17 it takes for a 256x256 RGB file, against 0.06 without (the benchmark's images,
timed alone). libspng can leave them out (``SPNG_CTX_IGNORE_ADLER32``, ``SPNG_CRC_USE``),
and imagecodecs' extension module exports libspng's functions, so they are called here
through :mod:`ctypes`: the decoding itself without the interpreter lock, as imagecodecs
decodes, and the calls around it (a context, its settings, the size) with it, since each
time the lock is let go a thread waiting for it may take it (under load, a thread switch
each way).

Where that module does not export them, or its libspng is not 0.7 (the version whose enums
are written below), :data:`decode_unchecked` is None and the caller decodes through
imagecodecs with the checksums written, as before.
"""

from __future__ import annotations

import ctypes
import logging
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np

__all__ = ["decode_unchecked", "version"]

log = logging.getLogger("chanseg.imaging")

# spng.h, 0.7.x
_IGNORE_ADLER32 = 1  # enum spng_ctx_flags
_CRC_USE = 2  # enum spng_crc_action: "ignore and don't calculate checksum"
_FMT_PNG = 256  # enum spng_format: the file's own format (8-bit grey or RGB here), unconverted


# name: (result, arguments); spng_decode_image lets go of the interpreter lock, the others hold it
_SIGNATURES = {
    "spng_version_string": (ctypes.c_char_p, []),
    "spng_strerror": (ctypes.c_char_p, [ctypes.c_int]),
    "spng_ctx_new": (ctypes.c_void_p, [ctypes.c_int]),
    "spng_ctx_free": (None, [ctypes.c_void_p]),
    "spng_set_crc_action": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]),
    "spng_set_png_buffer": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]),
    "spng_decoded_image_size": (
        ctypes.c_int,
        [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_size_t)],
    ),
    "spng_decode_image": (
        ctypes.c_int,
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int],
    ),
}


def _load() -> Optional[SimpleNamespace]:
    """libspng's functions from imagecodecs' module, or None (module docstring)."""
    try:
        from imagecodecs import _spng

        held, released = ctypes.PyDLL(_spng.__file__), ctypes.CDLL(_spng.__file__)  # one library, loaded once
        functions = {}
        for name, (result, arguments) in _SIGNATURES.items():
            function = getattr(released if name == "spng_decode_image" else held, name)
            function.restype, function.argtypes = result, arguments
            functions[name[len("spng_") :]] = function
    except (ImportError, OSError, AttributeError) as exc:  # another build: no such module or symbols
        log.debug(
            "libspng's own API is not reachable (%s: %s); PNGs decode through imagecodecs",
            type(exc).__name__,
            exc,
        )
        return None
    lib = SimpleNamespace(**functions)
    return lib if lib.version_string().startswith(b"0.7.") else None


_lib = _load()
version: Optional[str] = _lib.version_string().decode() if _lib is not None else None


def _check(code: int) -> None:
    if code:
        assert _lib is not None
        raise ValueError(f"libspng: {_lib.strerror(code).decode(errors='replace')}")


def _decode_unchecked(png: bytes, height: int, width: int, channels: int) -> np.ndarray:
    """An 8-bit grey or RGB PNG that this process wrote, as an ``(height, width, channels)``
    array, its chunk checksums and Adler-32 not computed. Raises ValueError if libspng
    refuses it or it is not that size."""
    assert _lib is not None
    ctx = _lib.ctx_new(_IGNORE_ADLER32)
    if not ctx:
        raise MemoryError("libspng: no decoding context")
    try:
        _check(_lib.set_crc_action(ctx, _CRC_USE, _CRC_USE))
        _check(_lib.set_png_buffer(ctx, png, len(png)))  # read in place: `png` outlives ctx
        size = ctypes.c_size_t()
        _check(_lib.decoded_image_size(ctx, _FMT_PNG, ctypes.byref(size)))
        out = np.empty((height, width, channels), np.uint8)
        if size.value != out.nbytes:
            raise ValueError(f"libspng: {size.value} bytes decoded, not {height}x{width}x{channels}")
        _check(_lib.decode_image(ctx, out.ctypes.data, out.nbytes, _FMT_PNG, 0))
        return out
    finally:
        _lib.ctx_free(ctx)


decode_unchecked: Optional[Callable[[bytes, int, int, int], np.ndarray]] = (
    _decode_unchecked if _lib is not None else None
)
