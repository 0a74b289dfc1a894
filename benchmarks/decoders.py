"""What decoding and encoding an image costs the host, per decoder, on the benchmarks' image sets.

``python -m benchmarks.decoders [--seconds 1.0]``

For each image set (``testbed.images.IMAGE_SETS``) and each way of decoding it:

- ``server``: what the server runs (``service.imaging.prepare_probed``: the fast decoders
  where they apply, the result at the bundled model's input size);
- ``PIL``: the same with PIL decoding (the server before issue 36);
- the libraries measured against PIL, decoding only: ``pyspng`` (libspng), ``imagecodecs``
  (libspng), ``simplejpeg`` (libjpeg-turbo, reduced while decoding as the server does),
  each where installed;

ms per image (median over passes of ``--seconds``), and ``lock``: the share of its time a
pure-Python thread beside it got to run (1.0: the decoder lets the interpreter lock go
while it decodes; about 0.5: it holds it, and decoding threads would run one at a time).
Then the mask PNG of one 256x256 and one 1024x1024 mask: PIL's encoder at zlib level 1
(what the server used before) against ``model.visualize.mask_png_bytes``; and the PNG
sets' pixel data (their IDAT streams) inflated by zlib (what libspng links) and by ISA-L
(what the server inflates them with before libspng unfilters them); and libspng reading
the file of stored blocks made of them, its checksums checked (imagecodecs) or not
(``service.libspng``, what the server does).
"""

from __future__ import annotations

import argparse
import io
import statistics
import threading
import time
import zlib
from typing import Callable, Dict, List, Optional

import imagecodecs
import numpy as np
from isal import isal_zlib
from PIL import Image

from model.data import synthetic_sample
from model.visualize import mask_png_bytes, mask_to_image
from service import imaging, libspng
from testbed.images import IMAGE_SETS

TARGET = (256, 256)


def per_image(fn: Callable[[bytes], object], images: List[bytes], seconds: float) -> float:
    """ms per image, the median of passes over ``images`` for about ``seconds``."""
    times, ends = [], time.perf_counter() + seconds
    while time.perf_counter() < ends or len(times) < 3:
        started = time.perf_counter()
        for data in images:
            fn(data)
        times.append((time.perf_counter() - started) / len(images))
    return statistics.median(times) * 1000


def lock_share(fn: Callable[[bytes], object], images: List[bytes], seconds: float = 0.5) -> float:
    """How much a counting thread runs while ``fn`` decodes, against while the caller sleeps."""

    def counted(work: Callable[[], None]) -> int:
        stop, out = threading.Event(), []

        def count() -> None:
            n = 0
            while not stop.is_set():
                n += 1
            out.append(n)

        thread = threading.Thread(target=count)
        thread.start()
        ends = time.perf_counter() + seconds
        while time.perf_counter() < ends:
            work()
        stop.set()
        thread.join()
        return out[0]

    idle = counted(lambda: time.sleep(0.001))
    return counted(lambda: [fn(data) for data in images[:2]]) / idle


def _server(decoder: Optional[str]) -> Callable[[bytes], object]:
    def run(data: bytes) -> object:
        probed = imaging.probe_image(data, 10**9, 1, "x", TARGET)
        if decoder is not None:
            probed.decoder = decoder
        return imaging.prepare_probed(probed, TARGET)

    return run


def candidates(set_name: str) -> Dict[str, Callable[[bytes], object]]:
    out: Dict[str, Callable[[bytes], object]] = {"server": _server(None), "PIL": _server(imaging.PIL)}
    if set_name.startswith("png"):
        try:
            import pyspng

            out["pyspng"] = pyspng.load
        except ImportError:
            print("(pyspng not installed: pip install pyspng)")

        out["imagecodecs"] = imagecodecs.spng_decode
    else:
        import simplejpeg

        def scaled(data: bytes) -> object:
            header = Image.open(io.BytesIO(data))
            header.draft(None, TARGET[::-1])
            w, h = header.size
            return simplejpeg.decode_jpeg(data, "RGBX", min_height=h, min_width=w)

        out["simplejpeg"] = scaled
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    print(f"{'images':<10} {'decoder':<12} {'ms/image':>9} {'lock':>6}")
    for set_name, make in IMAGE_SETS.items():
        images = make()
        for name, fn in candidates(set_name).items():
            ms = per_image(fn, images, args.seconds)
            print(f"{set_name:<10} {name:<12} {ms:>9.3f} {lock_share(fn, images):>6.2f}", flush=True)
    labels = synthetic_sample(5, 0, TARGET).mask.astype(np.uint8)
    print(f"\n{'mask':<10} {'encoder':<12} {'ms':>9} {'bytes':>8}")
    for side in (256, 1024):
        mask = np.kron(labels, np.ones((side // 256, side // 256), np.uint8))

        def pil(mask=mask) -> bytes:
            buf = io.BytesIO()
            mask_to_image(mask, 4).save(buf, format="PNG", compress_level=1)
            return buf.getvalue()

        for name, fn in (("PIL level 1", pil), ("chanseg", lambda mask=mask: mask_png_bytes(mask, 4))):
            ms = per_image(lambda _, fn=fn: fn(), [b""], args.seconds)
            print(f"{f'{side}x{side}':<10} {name:<12} {ms:>9.3f} {len(fn()):>8}")
    print(f"\n{'images':<10} {'inflate':<12} {'ms/image':>9}")
    for set_name, make in IMAGE_SETS.items():
        if set_name.startswith("png"):
            streams = [b"".join(imaging._idat_pieces(data)) for data in make()]
            for name, fn in (("zlib", zlib.decompress), ("ISA-L", isal_zlib.decompress)):
                print(f"{set_name:<10} {name:<12} {per_image(fn, streams, args.seconds):>9.3f}")
    if libspng.decode_unchecked is not None:
        print(f"\n{'images':<10} {'stored file':<12} {'ms/image':>9}")
        for set_name, make in IMAGE_SETS.items():
            if set_name.startswith("png"):
                images = make()
                checked = [imaging._stored_png(data) for data in images]
                unchecked = {
                    imaging._stored_png(data, checksums=False): imaging._ihdr(data) for data in images
                }
                for name, fn in (
                    ("checked", imagecodecs.spng_decode),
                    (
                        "unchecked",
                        lambda png, ihdr=unchecked: libspng.decode_unchecked(png, *_shape(ihdr[png])),
                    ),
                ):
                    files = checked if name == "checked" else list(unchecked)
                    print(f"{set_name:<10} {name:<12} {per_image(fn, files, args.seconds):>9.3f}")
    return 0


def _shape(ihdr: tuple) -> tuple:
    """(height, width, channels) from ``imaging._ihdr``'s (width, height, channels)."""
    width, height, channels = ihdr
    return height, width, channels


if __name__ == "__main__":
    raise SystemExit(main())
