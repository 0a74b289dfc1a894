"""The bundled default model: compiled once into a cache, and really segments."""

from __future__ import annotations

import io
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import model
from model import pretrained
from model.data import synthetic_sample
from model.scores import confusion_matrix, scores


@pytest.fixture(scope="module")
def default_segmenter(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("CHANSEG_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    try:
        yield model.load(device="cpu")
    finally:
        mp.undo()


def test_weights_ship_in_the_package():
    weights = pretrained.default_weights()
    assert weights.is_file() and weights.stat().st_size < 20 * 1024 * 1024
    assert pretrained.default_config() == model.ModelConfig()


def test_cache_is_reused_and_keyed(tmp_path, monkeypatch):
    monkeypatch.setenv("CHANSEG_CACHE_DIR", str(tmp_path))
    first = pretrained.default_artifact_path()
    assert first.parent == tmp_path and torch.__version__.replace("+", "_") in first.name
    calls = []
    monkeypatch.setattr(pretrained, "export_torchscript", lambda *a, **k: calls.append(a))
    again = model.load(device="cpu")
    assert pretrained.default_artifact_path() == first and calls == []
    assert again.version == model.read_artifact(first).version


def test_corrupt_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("CHANSEG_CACHE_DIR", str(tmp_path))
    path = pretrained.default_artifact_path()
    path.write_bytes(path.read_bytes()[:1000])
    seg = model.load(device="cpu")
    assert seg.name == "chanseg"
    model.read_artifact(path)  # valid again


def test_a_read_only_cache_uses_a_private_tmp_folder_and_never_a_planted_one(
    tmp_path, monkeypatch, tiny_artifact
):
    """Issue 31: a default-*.pt planted in the shared $TMPDIR/chanseg-cache would have been loaded."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CHANSEG_CACHE_DIR", str(tmp_path / "a-file" / "cache"))  # cannot be made: read-only
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    shared = tmp_path / "tmp" / f"chanseg-cache-{os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # another user's plant: writable by all
    name = pretrained.default_artifact_path(tmp_path / "probe").name
    shutil.copy(tiny_artifact, shared / name)  # the tiny model under the bundled one's name
    path = pretrained.default_artifact_path()
    assert path.parent != shared and model.read_artifact(path).config.name == "chanseg"
    for stale in shared.iterdir():
        stale.unlink()
    shared.rmdir()
    private = pretrained.default_artifact_path().parent  # created now: this user's alone
    assert private == shared and stat.S_IMODE(private.stat().st_mode) == 0o700


def test_held_out_miou(default_segmenter):
    confusion = torch.zeros(4, 4, dtype=torch.int64)
    samples = [synthetic_sample(2, i) for i in range(32)]  # seed 2: never used in training
    for sample, mask in zip(samples, default_segmenter.predict([s.image for s in samples])):
        confusion += confusion_matrix(torch.from_numpy(mask), torch.from_numpy(np.array(sample.mask)), 4)
    result = scores(confusion, model.ModelConfig().class_names)
    assert result["miou"] >= 0.85, result


def test_plain_shapes_drawn_with_pil(default_segmenter):
    """Not from the generator: flat background, plain shapes, saved and read back as PNG."""
    image = Image.new("RGB", (320, 240), (235, 235, 225))
    truth = Image.new("L", (320, 240), 0)
    shapes = [
        (1, "ellipse", [30, 40, 110, 120], (200, 30, 30)),
        (2, "rectangle", [150, 30, 260, 100], (30, 90, 200)),
        (3, "polygon", [(60, 220), (130, 140), (190, 220)], (20, 150, 40)),
        (1, "ellipse", [230, 150, 300, 220], (240, 180, 0)),
    ]
    for class_id, kind, geometry, colour in shapes:
        for draw, fill in ((ImageDraw.Draw(image), colour), (ImageDraw.Draw(truth), class_id)):
            getattr(draw, kind)(geometry, fill=fill)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    mask = default_segmenter.predict(Image.open(io.BytesIO(buf.getvalue())))
    truth = np.asarray(truth)
    assert mask.shape == truth.shape
    for class_id in range(4):
        region = truth == class_id
        agreement = (mask[region] == class_id).mean()
        assert agreement >= 0.9, (class_id, agreement)
