"""Segmenter.predict / predict_proba on images of any size and mode."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image


def _images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 256, (57, 33, 4), dtype=np.uint8), "RGBA")
    palette = rgb.resize((31, 29)).convert("P")
    grey16 = Image.fromarray(rng.integers(0, 65536, (20, 70), dtype=np.uint16))
    array = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    tensor = torch.from_numpy(rng.integers(0, 256, (200, 150, 3), dtype=np.uint8))
    return [rgb, grey, rgba, palette, grey16, array, tensor]


SIZES = [(80, 100), (48, 64), (57, 33), (29, 31), (20, 70), (64, 64), (200, 150)]


def test_masks_have_each_images_size(tiny_segmenter):
    masks = tiny_segmenter.predict(_images())
    assert [m.shape for m in masks] == SIZES
    assert all(m.dtype == np.uint8 and m.max() < 4 for m in masks)


def test_batched_equals_one_at_a_time(tiny_segmenter):
    images = _images()
    batched = tiny_segmenter.predict(images)
    for image, mask in zip(images, batched):
        np.testing.assert_array_equal(tiny_segmenter.predict(image), mask)


def test_single_image_gives_single_mask_and_4d_array_gives_list(tiny_segmenter):
    image = np.zeros((10, 12, 3), np.uint8)
    assert tiny_segmenter.predict(image).shape == (10, 12)
    assert len(tiny_segmenter.predict(np.zeros((3, 10, 12, 3), np.uint8))) == 3


def test_predict_proba_shapes_and_agrees_with_predict(tiny_segmenter):
    images = _images()[:3]
    probs = tiny_segmenter.predict_proba(images)
    masks = tiny_segmenter.predict(images)
    for p, m, size in zip(probs, masks, SIZES):
        assert p.shape == (4, *size) and p.dtype == np.float32
        np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
        assert (p.argmax(0) == m).mean() > 0.999


def test_one_batched_forward_for_a_list(tiny_segmenter, monkeypatch):
    calls = []
    original = tiny_segmenter.infer
    monkeypatch.setattr(tiny_segmenter, "infer", lambda batch: calls.append(len(batch)) or original(batch))
    tiny_segmenter.predict(_images())
    assert calls == [7]


def test_masks_follow_nearest_upsampling_of_model_resolution(tiny_segmenter):
    """A 2x upscaled image's mask is the input-size mask with each label doubled."""
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    small = tiny_segmenter.predict(image)
    labels = tiny_segmenter.infer([tiny_segmenter.prepare(image)])[0]
    big = tiny_segmenter.restore(labels, (128, 128))
    np.testing.assert_array_equal(big, np.kron(small, np.ones((2, 2), np.uint8)))


@pytest.mark.parametrize("factor", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_masks_restored_a_whole_number_of_times_wider_match_torch(factor, layout):
    """2, 4 and 8 times as wide take the multiply path (_BYTES_TIMES), 3 and 16 the gather;
    either way torch's nearest-exact, from any memory layout of the labels."""
    from torch.nn import functional as F

    from model import Segmenter

    rng = np.random.default_rng(factor)
    base = rng.integers(0, 256, (62, 80), dtype=np.uint8)  # every byte value, not just class ids
    labels = {"C": base[:31, :40], "F": np.asfortranarray(base[:31, :40]), "strided": base[::2, ::2]}[layout]
    size = (31 * 3 + 1, 40 * factor)
    expected = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(labels))[None, None], size=size, mode="nearest-exact"
    )
    restored = Segmenter.restore(torch.from_numpy(labels), size)
    np.testing.assert_array_equal(restored, expected[0, 0].numpy())
    out = np.empty(size, np.uint8)
    assert Segmenter.restore(torch.from_numpy(labels), size, out=out) is out
    np.testing.assert_array_equal(out, restored)


@pytest.mark.parametrize(
    "shape, size",
    [
        ((256, 256), (8, 8192)), ((256, 256), (1, 65536)), ((256, 256), (65536, 1)), ((1024, 64), (8, 8192)),
        ((4096, 16), (8, 8192)), ((31, 40), (7, 100)), ((31, 40), (5, 20)), ((31, 40), (30, 160)),
    ],
)  # fmt: skip
def test_a_mask_with_fewer_rows_than_its_labels_is_restored_from_those_rows(shape, size):
    """A wide, flat image's mask picks its rows from the labels before gathering their columns:
    torch's nearest-exact as before, and nothing in between larger than the labels or the
    mask (an 8x8192 mask from 256x256 labels held a 256x8192 array in between before)."""
    import tracemalloc

    from torch.nn import functional as F

    from model import Segmenter

    labels = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
    expected = F.interpolate(torch.from_numpy(labels)[None, None], size=size, mode="nearest-exact")[0, 0]
    tracemalloc.start()
    try:
        restored = Segmenter.restore(torch.from_numpy(labels), size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(restored, expected.numpy())
    indices = 24 * (size[0] + size[1])  # nearest_indices' int64 rows and columns, and its float temporaries
    assert peak <= max(size[0] * size[1], labels.size) + indices + (64 << 10), peak
    out = np.empty(size, np.uint8)
    assert Segmenter.restore(torch.from_numpy(labels), size, out=out) is out
    np.testing.assert_array_equal(out, restored)


@pytest.mark.parametrize("num_classes", [1, 2, 4, 12, 13, 21])
def test_class_counts_are_the_restored_masks_pixels_per_class(num_classes):
    """At the labels' size counted by comparisons (up to _COMPARED_CLASSES) or by
    np.bincount; at another size by the labels' runs (a mask's blobs) or label by label
    (noise): each way they are the restored mask's. Labels past the classes are not counted."""
    from model import Segmenter

    rng = np.random.default_rng(num_classes)
    noise = rng.integers(0, num_classes + 2, (61, 93), dtype=np.uint8)
    blobs = np.kron(noise[:4, :6], np.ones((16, 16), np.uint8))[:61, :93]  # at most 6 runs a row
    for labels in map(torch.from_numpy, (noise, np.ascontiguousarray(blobs))):
        for size in [(61, 93), (100, 70), (20, 200), (1, 1), (3000, 4000)]:
            mask = Segmenter.restore(labels, size)
            expected = [int(np.count_nonzero(mask == c)) for c in range(num_classes)]
            counts = Segmenter.class_counts(labels, size, num_classes)
            assert counts.dtype == np.int64 and counts.tolist() == expected, size


def test_restoring_the_transposed_labels_gives_the_transposed_mask():
    """Nearest restoring works on each axis alone, so the labels' transpose restored to
    (W, H) is the mask's transpose (the server's RLE path relies on it), through the
    multiply path (2, 4, 8 times as wide), the gather and downsampling alike."""
    from model import Segmenter

    labels = torch.from_numpy(np.random.default_rng(5).integers(0, 4, (32, 48), dtype=np.uint8))
    for size in [(64, 96), (128, 384), (96, 64), (33, 47), (10, 200), (200, 10), (32, 48)]:
        mask = Segmenter.restore(labels, size)
        np.testing.assert_array_equal(Segmenter.restore(labels.T, size[::-1]), mask.T)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_masks_past_float32s_exact_columns_still_match_torch(factor):
    """Past 2**23 columns torch's float32 indices are no longer i // factor: the gather again."""
    from torch.nn import functional as F

    from model import Segmenter

    width = (1 << 23) // factor + 16  # columns past 2**23, not only the last (clamped to the edge)
    labels = torch.from_numpy((np.arange(width) % 251).astype(np.uint8)[None])
    size = (1, width * factor)
    expected = F.interpolate(labels[None, None], size=size, mode="nearest-exact")[0, 0]
    np.testing.assert_array_equal(Segmenter.restore(labels, size), expected.numpy())


@pytest.mark.parametrize("src", [1, 3, 64, 100, 255, 257])
@pytest.mark.parametrize("dst", [1, 5, 64, 99, 256, 1000, 4001])
def test_host_stages_match_torch_kernels(src, dst):
    """restore/probabilities (numpy) and prepare's resize (PIL) agree with torch's
    nearest-exact and antialiased bilinear, which they replace on the host."""
    from torch.nn import functional as F

    from model import Segmenter
    from model.preprocess import resize_batch, resize_image

    rng = np.random.default_rng(src * 10_000 + dst)
    labels = torch.from_numpy(rng.integers(0, 4, (src, src + 1), dtype=np.uint8))
    expected = F.interpolate(labels[None, None], size=(dst, dst + 2), mode="nearest-exact")[0, 0]
    np.testing.assert_array_equal(Segmenter.restore(labels, (dst, dst + 2)), expected.numpy())

    logits = torch.randn(4, src, src + 1, generator=torch.Generator().manual_seed(dst))
    expected = F.interpolate(logits.softmax(0)[None], size=(dst, dst + 2), mode="nearest-exact")[0]
    torch.testing.assert_close(Segmenter.probabilities(logits, (dst, dst + 2)), expected)

    image = rng.integers(0, 256, (src, src + 1, 3), dtype=np.uint8)
    ours = resize_image(image, (min(dst, 300), 64)).astype(int)
    theirs = resize_batch([torch.from_numpy(image)], (min(dst, 300), 64), torch.device("cpu"))[0]
    assert np.abs(ours - theirs.numpy().astype(int)).max() <= 1


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.zeros((10, 10, 3), np.float32), TypeError),
        (np.zeros((10, 10, 2), np.uint8), ValueError),
        (np.zeros((0, 10, 3), np.uint8), ValueError),
        ("image.png", TypeError),
    ],
)
def test_bad_images_raise_clear_errors(tiny_segmenter, bad, error):
    with pytest.raises(error):
        tiny_segmenter.predict([bad])


def test_import_model_without_web_stack(tiny_artifact):
    code = f"""
import sys
BLOCKED = {{"fastapi", "uvicorn", "starlette", "service", "prometheus_client", "pydantic_settings"}}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import numpy as np
import model
seg = model.load({tiny_artifact!r}, device="cpu")
print(seg.predict(np.zeros((9, 7, 3), np.uint8)).shape)
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(name + " was importable")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(9, 7)"


def test_any_shape_is_resized_on_the_host_before_the_device(tiny_segmenter):
    """infer() on images of any size: resized on the host as prepare() does (PIL), so
    an extreme aspect ratio (8 x 100000: the device's antialiased resize raised on it)
    reaches no kernel but the network; the batch is stacked once."""
    rng = np.random.default_rng(5)
    odd = [
        torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
        for shape in ((8, 100_000, 3), (301, 7, 3))
    ]
    labels = tiny_segmenter.infer(odd)
    h, w = tiny_segmenter.config.input_size
    assert labels.shape == (2, h, w)
    prepared = [tiny_segmenter.prepare(t.numpy()) for t in odd]
    assert torch.equal(labels, tiny_segmenter.infer(prepared))
    assert tiny_segmenter.to_device(prepared).shape == (2, h, w, 3)


def test_recipe_is_measured_per_candidate(tiny_artifact):
    """What load() runs on CUDA to choose channels-last and cudnn.benchmark, here on the CPU."""
    from model.export import read_artifact
    from model.loading import measure_recipe

    recipe = measure_recipe(read_artifact(tiny_artifact), torch.device("cpu"), "fp32", batch=2, runs=2)
    assert set(recipe) == {"channels_last", "cudnn_benchmark", "ms"}
    assert len(recipe["ms"]) == 2 and all(v > 0 for v in recipe["ms"].values())  # NCHW and NHWC timed
    best = min(recipe["ms"], key=recipe["ms"].get)
    assert best == f"channels_last={recipe['channels_last']} cudnn_benchmark=False"
    assert torch.backends.cudnn.benchmark is False  # the global switch is left as it was
