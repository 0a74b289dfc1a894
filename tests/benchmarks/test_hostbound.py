"""benchmarks.hostbound: the stand-ins ``benchmarks.ab --model small|null`` serves load as
any artifact does and answer with the bundled model's classes at each image's size."""

from __future__ import annotations

import numpy as np
import pytest

import model
from benchmarks.hostbound import KINDS, make


@pytest.mark.parametrize("kind", KINDS)
def test_a_stand_in_is_a_model_like_the_bundled_one(kind, tmp_path):
    path = make(kind, tmp_path / f"{kind}.pt")
    segmenter = model.load(path, device="cpu")
    bundled = model.ModelConfig()
    assert tuple(segmenter.config.class_names) == bundled.class_names
    assert tuple(segmenter.config.input_size) == bundled.input_size
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    mask = segmenter.predict(image)
    assert mask.shape == (90, 120) and mask.max() < bundled.num_classes
    again = model.load(make(kind, tmp_path / "again.pt"), device="cpu")
    np.testing.assert_array_equal(again.predict(image), mask)  # the same weights every time


def test_an_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="small, null"):
        make("large", tmp_path / "x.pt")
