"""The declared interface is the whole contract: every endpoint, the auto batch
size and the probes work with a model that has no network and nothing but the
members of :class:`service.interface.ServedModel`."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.interface import ServedModel
from service.settings import Settings
from tests.service.conftest import png_bytes, serve
from tests.service.fake_model import FakeModel, banded

pytestmark = pytest.mark.anyio


def test_the_segmenter_and_the_fake_both_implement_it(tiny_segmenter):
    assert isinstance(tiny_segmenter, ServedModel)
    assert isinstance(FakeModel(), ServedModel)
    assert not isinstance(object(), ServedModel)


async def test_every_endpoint_serves_a_model_without_a_network(tmp_path, monkeypatch):
    monkeypatch.setenv("CHANSEG_CACHE_DIR", str(tmp_path))
    fake = FakeModel()
    settings = Settings(device="cpu", max_batch_size="auto", max_batch_delay_ms=20, log_level="warning")
    image, bands = banded(96, 64)
    expected = FakeModel().restore(FakeModel().infer([FakeModel().prepare(image)])[0], image.shape[:2])
    assert (expected == bands).mean() > 0.9  # the bands, give or take the resize at their edges
    async with serve(settings, segmenter=fake) as client:
        ready = await client.get("/readyz")
        info = (await client.get("/v1/model")).json()
        as_json = await client.post(
            "/predict", files=[("file", ("bands.png", png_bytes(image), "image/png"))]
        )
        as_png = await client.post(
            "/predict?format=png", content=png_bytes(image), headers={"content-type": "image/png"}
        )
        stacked = np.stack([image, image[::-1]])
        v2 = await client.post(
            "/v2/models/fake/infer",
            json={"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": list(stacked.shape), "data": stacked.ravel().tolist()}],
                  "outputs": [{"name": "MASK"}, {"name": "PROBABILITIES"}]},
        )  # fmt: skip
        meta = (await client.get("/v2/models/fake")).json()
        metrics = (await client.get("/metrics")).text
    assert ready.status_code == 200
    assert info["name"] == "fake" and info["classes"] == ["dark", "mid", "light"] and info["format"] == "fake"
    assert info["batching"]["max_batch_size_source"] == "measured" and info["batching"]["max_batch_size"] <= 8
    assert as_json.status_code == 200, as_json.text
    prediction = as_json.json()["predictions"][0]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["mask_png"]))))
    np.testing.assert_array_equal(mask, expected)
    fractions = np.bincount(expected.ravel(), minlength=3) / expected.size
    assert prediction["class_fractions"] == pytest.approx(dict(zip(["dark", "mid", "light"], fractions)))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(as_png.content))), expected)
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    masks = np.array(outputs["MASK"]["data"], np.uint8).reshape(outputs["MASK"]["shape"])
    np.testing.assert_array_equal(masks[0], expected)
    flipped = FakeModel().restore(FakeModel().infer([FakeModel().prepare(image[::-1])])[0], image.shape[:2])
    np.testing.assert_array_equal(masks[1], flipped)
    assert outputs["PROBABILITIES"]["shape"] == [2, 3, 96, 64]
    assert meta["platform"] == "pytorch_fake" and meta["outputs"][1]["shape"] == [-1, 3, -1, -1]
    assert 'name="fake"' in metrics and 'version="2"' in metrics
    assert fake.batches  # the batches ran on the fake itself
