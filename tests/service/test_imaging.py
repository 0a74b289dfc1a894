"""decode_image: formats, modes, orientation, and limits checked from the header."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service import imaging, libspng
from service.errors import BadImage, PayloadTooLarge
from service.imaging import decode_image, prepare_probed, probe_image
from tests.service.conftest import png_bytes, png_chunk, random_image, raw_png, scanlines, zlib_header

BIG = 10**9
ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_large_jpeg_decodes_reduced_to_what_the_model_needs(orientation):
    """Probed for a model's input size, a JPEG more than twice that size decodes at
    1/2, 1/4 or 1/8 (libjpeg's DCT scaling), still covering the input size: the
    same picture from far fewer pixels. The full size is what the mask is restored to."""
    from model.preprocess import prepare_image
    from testbed.images import make_images

    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: shown rotated, 1200 wide and 1600 high
    photo = Image.open(io.BytesIO(make_images(1, (1200, 1600), "JPEG")[0]))  # 1600 wide in the file
    data = encode(photo, "JPEG", quality=90, exif=exif.tobytes())
    shown = (1200, 1600) if orientation == 6 else (1600, 1200)
    target = (48, 64)  # (h, w): 64 wide and 48 high as shown

    probed = probe_image(data, BIG, 1, "photo.jpg", target)
    assert (probed.width, probed.height) == shown
    # 1/8 of each side; as shown, so its longer side is the one shown longer.
    assert probed.decoded_size == (shown[0] // 8, shown[1] // 8)
    full = probe_image(
        data, BIG, 1, "photo.jpg"
    )  # without a target: decoded at full size, as decode_image does
    assert full.decoded_size is None and probed.cost < full.cost / 2  # both include 8 MiB of fixed cost

    reduced = prepare_probed(probed, target)
    reference = prepare_image(decode_image(data, BIG), target)
    assert reduced.shape == reference.shape == (48, 64, 3)
    assert (
        np.abs(reduced.astype(int) - reference).mean() < 3
    )  # the same picture, not another crop or rotation


def test_a_jpeg_within_twice_the_input_size_decodes_at_full_size():
    data = encode(Image.fromarray(random_image(2, 120, 500)), "JPEG")  # 120 high: under 2 x 64
    probed = probe_image(data, BIG, 1, "strip.jpg", (64, 64))
    assert probed.decoded_size is None


def _png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + png_chunk(b"IEND", b"")
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


# -- memory: what decoding costs, known from the header ---------------------------

_COST_PROBE = r"""
import io, re, sys
from pathlib import Path
from PIL import Image
from service.imaging import probe_image, prepare_probed
from service.resources import release_free_memory

def enc(image, fmt, **kw):
    buf = io.BytesIO(); image.save(buf, format=fmt, **kw); return buf.getvalue()

def rss(field):
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

S = (2000, 2000)
exif = Image.Exif(); exif[0x0112] = 6
pal = Image.new("P", S, 1); pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
noise = Image.effect_noise(S, 60).convert("RGB")
cases = {
    "png rgb": enc(Image.new("RGB", S, (200, 30, 30)), "PNG"),
    "png rgb at the model's size": enc(noise.resize((256, 256)), "PNG"),
    "jpeg grey": enc(noise.convert("L"), "JPEG", quality=90),
    "png grey": enc(Image.new("L", S, 100), "PNG"),
    "png 16-bit": enc(Image.new("I;16", S, 40000), "PNG"),
    "png rgba": enc(Image.new("RGBA", S, (30, 30, 200, 128)), "PNG"),
    "png palette+alpha": enc(pal, "PNG", transparency=0),
    "png palette": enc(pal, "PNG"),
    "png grey+alpha": enc(Image.new("LA", S, (100, 50)), "PNG"),
    "png rotated": enc(Image.new("RGB", S, (200, 30, 30)), "PNG", exif=exif),
    "jpeg": enc(noise, "JPEG", quality=90),
    "jpeg full size": enc(noise, "JPEG", quality=90),  # probed for a 1024x1024 model: not reduced
    "jpeg rotated": enc(noise, "JPEG", quality=90, exif=exif),
    "jpeg progressive": enc(noise, "JPEG", quality=90, progressive=True),
    "jpeg progressive 4:4:4": enc(noise, "JPEG", quality=90, progressive=True, subsampling=0),
    "jpeg cmyk": enc(Image.new("CMYK", S, (0, 200, 200, 0)), "JPEG"),
    "tiff deflate": enc(Image.new("RGB", S, (90, 90, 90)), "TIFF", compression="tiff_adobe_deflate"),
    "tiff raw": enc(Image.new("RGB", S, (90, 90, 90)), "TIFF"),
    "webp": enc(noise, "WEBP", quality=80),
    "webp rgba lossless": enc(Image.new("RGBA", S, (10, 120, 10, 100)), "WEBP", lossless=True),
    "gif": enc(Image.new("P", S, 3), "GIF"),
    "bmp": enc(Image.new("RGB", (1500, 1500), (1, 2, 3)), "BMP"),
    "tall strip": enc(Image.new("RGB", (8, 400_000), (1, 2, 3)), "PNG"),
    "wide strip": enc(Image.new("RGB", (400_000, 8), (1, 2, 3)), "PNG"),
}
del noise, pal
for name, data in cases.items():
    target = (1024, 1024) if name == "jpeg full size" else (256, 256)
    probed = probe_image(data, 10**9, 1, name, target)
    release_free_memory()
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    before = rss("VmRSS")
    prepare_probed(probed, target)
    print(f"{name}|{rss('VmHWM') - before}|{probed.cost}", flush=True)
    del probed
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_decode_cost_covers_the_peak():
    """For every format and mode served, the cost read from the header is at least
    the process's peak RSS growth while the image is decoded and resized (glibc
    malloc, memory handed back between images)."""
    env = {**os.environ, "LD_PRELOAD": "", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _COST_PROBE], capture_output=True, text=True, env=env, timeout=300, check=True
    ).stdout
    rows = [line.split("|") for line in out.splitlines()]
    assert len(rows) == 24
    over = {name: (int(peak) / int(cost)) for name, peak, cost in rows if int(peak) > int(cost)}
    assert over == {}, over
    # and the estimate is not wildly pessimistic for the common cases
    ratios = {name: int(peak) / int(cost) for name, peak, cost in rows}
    assert ratios["png rgb"] > 0.6 and ratios["jpeg full size"] > 0.5, ratios
    # A JPEG reduced while it decodes (2000x2000 at 1/4 for 256x256) holds a fraction of the full size's memory.
    peaks = {name: int(peak) for name, peak, _ in rows}
    assert (
        peaks["jpeg"] < peaks["jpeg full size"] / 4 and peaks["jpeg rotated"] < peaks["jpeg full size"] / 4
    ), peaks


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (300, 200), 77),
        Image.fromarray(np.random.default_rng(0).integers(0, 65535, (200, 300), dtype=np.uint16)),
        Image.fromarray(random_image(4, 200, 300)).convert("RGBA"),
        Image.fromarray(np.dstack([random_image(5, 200, 300), random_image(6, 200, 300)[..., :1]]), "RGBA"),
        Image.fromarray(random_image(7, 200, 300)).convert("P"),
        Image.fromarray(random_image(8, 200, 300)).convert("LA"),
        Image.fromarray(random_image(9, 200, 300)).convert("CMYK"),
    ],
    ids=["grey", "16-bit", "rgba opaque", "rgba", "palette", "grey+alpha", "cmyk"],
)
def test_prepare_in_pil_matches_the_array_path(image):
    """The server resizes PIL images without full-size copies (grey before it becomes
    RGB, alpha composited by paste); the pixels are those of the plain array path."""
    from model.preprocess import prepare_image, resize_image, to_rgb_array

    lean = prepare_image(image, (64, 48))
    plain = resize_image(to_rgb_array(image), (64, 48))
    np.testing.assert_array_equal(lean, plain)


def test_alpha_composites_on_black_like_alpha_composite():
    from model.preprocess import to_rgb_image

    values = np.arange(256, dtype=np.uint8)
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[..., :3] = values[:, None, None]
    rgba[..., 3] = values[None, :]
    image = Image.fromarray(rgba, "RGBA")
    reference = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image).convert("RGB")
    np.testing.assert_array_equal(np.asarray(to_rgb_image(image)), np.asarray(reference))


def test_orientation_comes_from_the_header_not_a_late_chunk():
    """EXIF read before decoding decides the cost and the rotation; PNG's own getexif
    would decode the whole image to look further."""
    image = Image.fromarray(random_image(10, 20, 40))
    exif = Image.Exif()
    exif[0x0112] = 8
    probed = probe_image(encode(image, "PNG", exif=exif.tobytes()), BIG)
    assert (probed.width, probed.height) == (20, 40) and probed.orientation is not None
    plain = probe_image(encode(image, "PNG"), BIG)
    assert plain.orientation is None and plain.cost < probed.cost


# -- fuzzing every decoder, not only PNG ------------------------------------------

_SEEDS = {
    fmt: encode(Image.fromarray(random_image(11, 24, 20)).convert(mode), fmt, **kw)
    for fmt, mode, kw in [
        ("JPEG", "RGB", {"quality": 80}),
        ("WEBP", "RGB", {"quality": 80}),
        ("TIFF", "RGB", {"compression": "tiff_lzw"}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("PNG", "RGBA", {}),
    ]
}


def _mutate(seed: bytes, flips: list, cut: int) -> bytes:
    data = bytearray(seed[: max(1, cut)])
    for index, value in flips:
        data[index % len(data)] ^= value
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(
    fmt=st.sampled_from(sorted(_SEEDS)),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=12),
    cut=st.integers(1, 10_000),
)
def test_mutated_files_of_every_format_raise_only_our_errors(fmt, flips, cut):
    """Bit flips and truncations of JPEG, WebP, TIFF, GIF, BMP and PNG files: the
    image decodes, or BadImage / PayloadTooLarge says why; PIL's own exceptions
    (struct.error, KeyError, ZeroDivisionError, ...) never escape, and PIL's
    messages are not passed on. Both ways: full size, and the server's (probed for
    an 8x8 input, which has the 24x20 JPEG decode at half its size)."""

    data = _mutate(_SEEDS[fmt], flips, cut)
    for decode in (
        lambda: decode_image(data, 1_000_000, 1, "f"),
        lambda: prepare_probed(probe_image(data, 1_000_000, 1, "f", (8, 8)), (8, 8)),
    ):
        try:
            out = decode()
        except (BadImage, PayloadTooLarge) as exc:
            assert str(exc).startswith("f: ")
            continue
        assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8


def test_messages_are_ours_not_pils():
    truncated = png_bytes(random_image(12, 64, 64))[:200]
    with pytest.raises(BadImage) as raised:
        decode_image(truncated, BIG, 1, "a.png")
    assert str(raised.value) == "a.png: corrupt or truncated image data"
    with pytest.raises(BadImage) as raised:
        decode_image(b"GIF89a" + b"\x00" * 20, BIG, 1, "b.gif")
    assert str(raised.value) in ("b.gif: not a decodable image (PNG, JPEG, WebP, BMP, TIFF or GIF)",
                                 "b.gif: corrupt or truncated image data")  # fmt: skip


# -- the fast decoders: libjpeg-turbo (simplejpeg) and libspng (imagecodecs) ---------


def _shapes(h: int, w: int, mode: str) -> Image.Image:
    from model.data import synthetic_sample

    return Image.fromarray(synthetic_sample(3, h + w, (h, w)).image).convert(mode)


def _both(data: bytes, target) -> tuple:
    """prepare_probed's pixels as the server decodes them, and as PIL alone does."""
    fast = probe_image(data, BIG, 1, "x", target)
    plain = probe_image(data, BIG, 1, "x", target)
    plain.decoder = imaging.PIL
    chosen = fast.decoder
    out = prepare_probed(fast, target)
    assert chosen == imaging.PIL or fast.data == b"", f"{chosen} declined a valid file"  # it decoded it
    return chosen, out, prepare_probed(plain, target)


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 7])
@pytest.mark.parametrize(
    "fmt,save",
    [("PNG", {}), ("JPEG", {"quality": 90}), ("JPEG", {"quality": 75, "progressive": True}),
     ("JPEG", {"quality": 95, "subsampling": 0})],
    ids=["png", "jpeg", "jpeg progressive", "jpeg 4:4:4"],
)  # fmt: skip
@pytest.mark.parametrize("size", [(256, 256), (255, 257), (1024, 768), (100, 1200)])
def test_fast_decoders_give_pils_pixels(mode, orientation, fmt, save, size):
    """Same pixels as PIL's decode at every step the server takes: at the model's size,
    resized, reduced while decoding (JPEG), rotated by EXIF, grey."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(_shapes(*size, mode), fmt, exif=exif.tobytes(), **save)
    for target in ((256, 256), (96, 64)):
        chosen, fast, plain = _both(data, target)
        # libspng only where its array is the model's input as it is (no copy beside PIL's)
        final = orientation == 1 and size == target
        assert chosen == (imaging.SIMPLEJPEG if fmt == "JPEG" else imaging.SPNG if final else imaging.PIL)
        np.testing.assert_array_equal(fast, plain)


@pytest.mark.parametrize(
    "image,fmt,decoder",
    [
        (Image.new("RGB", (32, 32)), "PNG", "spng"),
        (Image.new("L", (32, 32)), "PNG", "spng"),
        (Image.new("RGB", (32, 32)), "JPEG", "simplejpeg"),
        (Image.new("L", (32, 32)), "JPEG", "simplejpeg"),
        (Image.new("CMYK", (32, 32)), "JPEG", "pil"),
        (Image.new("RGBA", (32, 32)), "PNG", "pil"),
        (Image.new("P", (32, 32)), "PNG", "pil"),
        (Image.new("I;16", (32, 32)), "PNG", "pil"),
        (Image.new("RGB", (32, 32)), "WEBP", "pil"),
    ],
    ids=[
        "png rgb",
        "png grey",
        "jpeg rgb",
        "jpeg grey",
        "jpeg cmyk",
        "png rgba",
        "png palette",
        "png 16-bit",
        "webp",
    ],
)
def test_which_decoder(image, fmt, decoder):
    assert probe_image(encode(image, fmt), BIG, 1, "x", (32, 32)).decoder == decoder


def _through_pil(data: bytes, target, max_pixels: int = BIG, min_side: int = 1):
    """probe_image as it reads any file but a plain PNG: PIL opens it."""
    plain, imaging._plain_png = imaging._plain_png, lambda *args: None
    try:
        return probe_image(data, max_pixels, min_side, "x", target)
    finally:
        imaging._plain_png = plain


def _fields(probed) -> tuple:
    return (
        probed.width,
        probed.height,
        probed.orientation,
        probed.cost,
        probed.mode,
        probed.decoded_size,
        probed.decoder,
    )


def _direct(data: bytes, target, max_pixels: int = BIG, min_side: int = 1):
    return probe_image(data, max_pixels, min_side, "x", target)


def _outcome(probe, data: bytes, target, max_pixels: int = BIG, min_side: int = 1) -> tuple:
    """What the server makes of a file, probed by ``probe``: the model's input, or the error
    the client gets."""
    try:
        probed = probe(data, target, max_pixels, min_side)
        return "pixels", _fields(probed), prepare_probed(probed, target).tobytes()
    except Exception as exc:
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize(
    "data,target",
    [
        (encode(Image.fromarray(random_image(10, 256, 256)), "PNG"), (256, 256)),
        (encode(Image.fromarray(random_image(11, 64, 80)[..., 0]), "PNG", optimize=True), (64, 80)),
        (raw_png(random_image(12, 31, 7), pieces=3), (31, 7)),
        (raw_png(random_image(13, 1, 1)), (1, 1)),
    ],
    ids=["PIL rgb", "PIL grey", "three IDATs", "one pixel"],
)
def test_a_plain_png_is_probed_without_pil_as_pil_probes_it(data, target):
    """Its first two chunks say all the probe needs (docs/performance.md, "Host work per image")."""
    fast = probe_image(data, BIG, 1, "x", target)
    assert fast.image is None and fast.decoder == imaging.SPNG
    assert _fields(fast) == _fields(_through_pil(data, target))
    assert _outcome(lambda *_: fast, data, target) == _outcome(_through_pil, data, target)


def test_what_the_plain_png_read_does_not_take_pil_probes_as_before():
    image = random_image(14, 20, 30)
    plain = raw_png(image)
    ihdr_end = 8 + 8 + 13 + 4
    bad_ihdr_crc = bytearray(plain)
    bad_ihdr_crc[ihdr_end - 1] ^= 1
    sixteen_bit = bytearray(plain)
    sixteen_bit[24] = 16
    cases = {
        "another size: PIL resizes it": (plain, (20, 31), BIG, 1),
        "interlaced": (raw_png(image, interlace=1), (20, 30), BIG, 1),
        "grey": (raw_png(image[..., 0]), (20, 30), BIG, 1),  # taken: the control
        "a chunk before the pixels": (
            plain[:ihdr_end] + png_chunk(b"gAMA", struct.pack(">I", 45455)) + plain[ihdr_end:],
            (20, 30),
            BIG,
            1,
        ),
        "transparency": (encode(Image.fromarray(image), "PNG", transparency=(1, 2, 3)), (20, 30), BIG, 1),
        "palette": (encode(Image.fromarray(image).convert("P"), "PNG"), (20, 30), BIG, 1),
        "16 bits, as declared": (bytes(sixteen_bit), (20, 30), BIG, 1),
        "the IHDR's checksum": (bytes(bad_ihdr_crc), (20, 30), BIG, 1),
        "cut short": (plain[:40], (20, 30), BIG, 1),
        "over max_pixels": (plain, (20, 30), 599, 1),
        "under min_side": (plain, (20, 30), BIG, 21),
    }
    for why, (data, target, max_pixels, min_side) in cases.items():
        taken = imaging._plain_png(data, "x", max_pixels, min_side, target) is not None
        assert taken == (why == "grey"), why
        fast = _outcome(_direct, data, target, max_pixels, min_side)
        assert fast == _outcome(_through_pil, data, target, max_pixels, min_side), why


def test_a_probe_is_decoded_once_whoever_read_its_header():
    image = random_image(16, 20, 30)
    plain = probe_image(raw_png(image), BIG, 1, "x", (20, 30))
    assert plain.image is None  # its header read without PIL
    assert np.array_equal(np.asarray(imaging.decode_probed(plain)), image)  # PIL opens it then
    through_pil = probe_image(raw_png(image), BIG, 1, "x", (40, 60))  # resized: PIL read it
    imaging.decode_probed(through_pil)
    for probed in (plain, through_pil):
        with pytest.raises(RuntimeError, match="already decoded"):
            imaging.decode_probed(probed)


def test_a_png_whose_first_ihdr_is_not_the_one_pil_reads_is_pils():
    """PIL reads the last IHDR of a file with two, libspng the first: the size PIL read (and
    the limits were checked on) must be the one libspng would decode, else a small header in
    front of a large image's pixels would decode far past what was reserved."""
    small, large = random_image(17, 20, 30), np.zeros((300, 400, 3), np.uint8)
    ihdr_end = 8 + 8 + 13 + 4
    second = raw_png(small)[8:ihdr_end]
    data = raw_png(large)[:ihdr_end] + second + raw_png(large)[ihdr_end:]
    probed = probe_image(data, BIG, 1, "x", (20, 30))
    assert (probed.height, probed.width) == (20, 30)  # what PIL read
    assert probed.decoder == imaging.PIL
    assert imaging._plain_png(data, "x", BIG, 1, (20, 30)) is None
    assert imaging._plain_png(data, "x", BIG, 1, (300, 400)) is None  # an IHDR, not IDAT, follows


def test_every_bit_of_a_plain_pngs_head_flipped_reads_as_through_pil():
    """Each of the first 48 bytes (signature, IHDR, the IDAT's header and first bytes) with
    one bit flipped: the same pixels or the same error either way."""
    data = raw_png(random_image(15, 12, 9))
    target = (12, 9)
    for at in range(48):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[at] ^= 1 << bit
            flipped = bytes(flipped)
            assert _outcome(_direct, flipped, target) == _outcome(_through_pil, flipped, target), (at, bit)


@pytest.mark.parametrize(
    "image",
    [random_image(0, 256, 256), random_image(1, 31, 70), random_image(2, 300, 257)[..., 0], np.zeros((1, 1, 3), np.uint8)],
    ids=["256x256", "31x70", "grey", "one pixel"],
)  # fmt: skip
@pytest.mark.parametrize("writer", ["PIL", "two IDATs", "600 IDATs"])
def test_pngs_pixel_data_inflated_by_isal_are_libspngs_own_pixels(image, writer):
    """ISA-L inflates the pixel data, libspng reads it as stored blocks: the pixels are those
    libspng decodes from the file itself (and PIL: test_fast_decoders_give_pils_pixels)."""
    if writer == "PIL":
        data = encode(Image.fromarray(image), "PNG", optimize=True)  # PIL's filters, level 9
    else:
        data = raw_png(image, pieces=2 if writer == "two IDATs" else 600)
    stored = imaging._stored_png(data)
    assert stored is not None and b"IDAT" in stored
    pixels = imagecodecs.spng_decode(stored)
    assert np.array_equal(pixels, imagecodecs.spng_decode(data))
    assert np.array_equal(pixels.reshape(image.shape), image)
    assert np.array_equal(imaging._spng_decode(data).reshape(image.shape), image)
    # Without its checksums, by libspng's own API: the same pixels.
    unchecked = imaging._stored_png(data, checksums=False)
    h, w = image.shape[:2]
    channels = 3 if image.ndim == 3 else 1
    assert np.array_equal(libspng.decode_unchecked(unchecked, h, w, channels).reshape(image.shape), image)
    with pytest.raises(Exception, match="(?i)crc|stream"):  # the zeros: why a decoder must be told
        imagecodecs.spng_decode(unchecked)


def test_libspngs_own_api_is_reachable_here():
    """The pinned imagecodecs exports libspng 0.7's functions; when a build stops doing so,
    PNGs decode through imagecodecs with their checksums (slower, same pixels): this says so."""
    assert libspng.decode_unchecked is not None and libspng.version.startswith("0.7.")


def test_without_libspngs_own_api_pngs_decode_the_same(monkeypatch):
    image = random_image(7, 40, 33)
    data = raw_png(image, pieces=3)
    fast = imaging._spng_decode(data)
    monkeypatch.setattr(libspng, "decode_unchecked", None)
    assert np.array_equal(imaging._spng_decode(data), fast)
    assert np.array_equal(fast.reshape(image.shape), image)


def test_libspngs_own_api_refuses_what_is_not_the_image_it_was_told():
    """A file cut short, or not the size the header said, is a ValueError (which sends the
    image to PIL, as any fast decoder's refusal does), never pixels past the array."""
    image = random_image(8, 20, 30)
    unchecked = imaging._stored_png(raw_png(image), checksums=False)
    with pytest.raises(ValueError, match="libspng"):
        libspng.decode_unchecked(unchecked[: len(unchecked) // 2], 20, 30, 3)
    for shape in ((19, 30, 3), (20, 30, 1), (40, 30, 3)):
        with pytest.raises(ValueError, match="not"):
            libspng.decode_unchecked(unchecked, *shape)
    with pytest.raises(ValueError, match="libspng"):
        libspng.decode_unchecked(b"not a png at all", 1, 1, 3)


def test_pngs_the_isal_path_leaves_to_libspng_and_pil():
    """What this path does not take as it is goes to libspng whole, as before: it refuses
    or decodes, and then PIL decides. A stream that inflates past the image (a bomb in a
    small file) is never inflated further than one byte past it."""
    image = random_image(3, 40, 50)
    rows = scanlines(image)
    good = raw_png(image, pieces=3)
    bad_crc = bytearray(good)
    bad_crc[good.index(b"IDAT") + 10] ^= 1
    bomb = raw_png(image, stream=zlib.compress(rows + bytes(50 << 20), 9))  # +50 MiB in ~50 KB
    cases = {
        "interlaced": raw_png(image, interlace=1),
        "an IDAT's CRC": bytes(bad_crc),
        "a chunk between IDATs": raw_png(image, pieces=3, between=png_chunk(b"tEXt", b"k\x00v")),
        "data past the image": bomb,
        "a stream too short": raw_png(image, stream=zlib.compress(rows[:-1])),
        "bytes after the stream": raw_png(image, stream=zlib.compress(rows) + b"\x00"),
        "the stream's Adler-32": raw_png(image, stream=zlib.compress(rows)[:-4] + b"\x00\x00\x00\x01"),
        f"over {imaging._MAX_IDAT_CHUNKS} IDATs": raw_png(
            random_image(4, 200, 200), pieces=imaging._MAX_IDAT_CHUNKS + 5
        ),
    }
    for why, data in cases.items():
        assert imaging._stored_png(data) is None, why
        try:
            expected = imagecodecs.spng_decode(data)
        except Exception as exc:  # libspng's refusal, the same either way
            with pytest.raises(type(exc)):
                imaging._spng_decode(data)
        else:
            assert np.array_equal(imaging._spng_decode(data), expected), why
    assert imaging._stored_png(good) is not None


def test_a_window_zlib_refuses_is_refused_here_too():
    """ISA-L reads a stream whose header declares a window over 32 KiB; zlib, libspng and PIL
    call it broken. So does this path (it leaves the file to libspng, which refuses it)."""
    image = random_image(5, 16, 16)
    rows = scanlines(image)
    body = zlib.compress(rows)[2:]
    assert imaging._stored_png(raw_png(image, stream=zlib_header(7) + body)) is not None
    for cinfo in (8, 15):
        data = raw_png(image, stream=zlib_header(cinfo) + body)
        assert imaging._stored_png(data) is None
        with pytest.raises(Exception, match="(?i)idat|stream"):
            imagecodecs.spng_decode(data)


def test_the_compressed_stream_is_not_copied():
    """An IDAT made long without adding pixels (empty stored blocks, 5 bytes each) was joined
    into one copy of itself: memory that decode_cost does not count. It is read in place."""
    import tracemalloc

    image = random_image(6, 8, 8)
    rows = scanlines(image)
    stream = (
        zlib_header(7) + b"\x00\x00\x00\xff\xff" * 1_000_000  # 5 MB of empty blocks
        + b"\x01" + struct.pack("<HH", len(rows), len(rows) ^ 0xFFFF) + rows
        + struct.pack(">I", zlib.adler32(rows))
    )  # fmt: skip
    data = raw_png(image, stream=stream)
    tracemalloc.start()
    try:
        pixels = imaging._spng_decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(pixels.reshape(image.shape), image)
    assert peak < len(data) // 10, f"{peak} bytes allocated for a {len(data)}-byte file"


def test_16_bit_and_transparent_pngs_stay_with_pil():
    """Mode RGB or L in PIL can still be 16 bits a sample, or carry a transparent colour."""
    rgb16 = bytearray(png_bytes(random_image(1, 20, 20)))
    grey = Image.fromarray(random_image(2, 20, 20)[..., 0])
    assert probe_image(encode(grey, "PNG", transparency=7), BIG).decoder == imaging.PIL
    rgb16[24] = 16  # the IHDR's bit depth, as a 16-bit file declares it
    assert imaging._fast_decoder("PNG", "RGB", bytes(rgb16), {}, (20, 20)) == imaging.PIL


def test_a_file_a_fast_decoder_refuses_is_pils_to_judge():
    """libjpeg-turbo in strict mode refuses a JPEG with stray bytes before a marker, which
    PIL decodes (libjpeg only warns): served as before. A truncated file is corrupt to both."""
    data = encode(_shapes(64, 64, "RGB"), "JPEG", quality=90)
    sos = data.index(b"\xff\xda")
    stray = data[:sos] + b"\x00\x00" + data[sos:]
    probed = probe_image(stray, BIG, 1, "x", (64, 64))
    assert probed.decoder == imaging.SIMPLEJPEG
    out = prepare_probed(probed, (64, 64))
    assert probed.data != b""  # simplejpeg declined, PIL decoded it
    np.testing.assert_array_equal(out, decode_image(stray, BIG))
    for broken in (data[: len(data) // 2], png_bytes(random_image(3, 64, 64))[:-200]):
        with pytest.raises(BadImage, match="corrupt or truncated"):
            prepare_probed(probe_image(broken, BIG, 1, "x", (64, 64)), (64, 64))


def test_a_png_with_compressed_chunks_before_its_pixels_goes_to_pil():
    """libspng inflates and keeps every zTXt, iTXt and iCCP chunk before the pixels, with no
    limit: a small file of many (an iTXt whose language tag PIL drops uncounted) would hold far
    more memory than its cost. Such a PNG is PIL's to decode, within PIL's own limits."""
    from PIL.PngImagePlugin import PngInfo

    image = Image.fromarray(random_image(4, 16, 16))
    compressed, plain = PngInfo(), PngInfo()
    compressed.add_text("comment", "x" * 10_000, zip=True)
    plain.add_text("comment", "short")
    assert probe_image(encode(image, "PNG", pnginfo=compressed), BIG).decoder == imaging.PIL
    assert probe_image(encode(image, "PNG", icc_profile=b"\0" * 200), BIG).decoder == imaging.PIL
    assert probe_image(encode(image, "PNG", pnginfo=plain), BIG, 1, "x", (16, 16)).decoder == imaging.SPNG
    # the attack's shape: iTXt chunks PIL inflates and drops (a bad language tag), one per KiB
    itxt = b"note\x00\x01\x00\xff\x00\x00" + zlib.compress(b"\xff" * (1 << 20))
    chunk = png_chunk(b"iTXt", itxt)
    data = encode(image, "PNG")
    crafted = data[:33] + chunk * 50 + data[33:]
    probed = probe_image(crafted, BIG, 1, "x", (16, 16))
    assert probed.decoder == imaging.PIL
    np.testing.assert_array_equal(prepare_probed(probed, (16, 16)), np.asarray(image))
