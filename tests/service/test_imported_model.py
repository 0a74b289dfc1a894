"""A model nobody here wrote, imported with the CLI and served by a real
``python -m service``: the masks over HTTP (``/predict`` and v2) are the argmax
of the original module's logits, computed here, at each image's own size."""

from __future__ import annotations

import io
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.model.test_import import ROOT, monai_models, reference_mask, scripted
from tests.service.conftest import ServerProcess, png_bytes

pytestmark = pytest.mark.slow  # a real server, a real part or a compile: make test-all


@pytest.mark.parametrize("which", ["unet", "segresnet"])
def test_an_imported_model_is_served_over_http(which, tmp_path):
    net = monai_models()[which]
    artifact = tmp_path / f"{which}.pt"
    done = subprocess.run(
        [sys.executable, "-m", "model", "import", str(scripted(net, tmp_path / f"{which}.ts")),
         "--classes", "background,cells,nuclei", "--input-size", "64", "64", "--name", which, "-o", str(artifact)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rng = np.random.default_rng(7)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((64, 64, 3), (120, 80, 3), (33, 190, 3))
    ]
    server = ServerProcess(str(artifact), tmp_path)
    try:
        server.wait_ready()
        info = httpx.get(server.url + "/v1/model").json()
        masks = []
        for image in images:
            r = httpx.post(
                server.url + "/predict?format=png",
                content=png_bytes(image),
                headers={"content-type": "image/png"},
            )
            assert r.status_code == 200, r.text
            masks.append(np.asarray(Image.open(io.BytesIO(r.content))))
        h, w = 40, 30
        stacked = np.stack([rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2)])
        v2 = httpx.post(
            server.url + f"/v2/models/{which}/infer",
            json={"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": list(stacked.shape), "data": stacked.ravel().tolist()}],
                  "outputs": [{"name": "MASK"}]},
        )  # fmt: skip
    finally:
        server.stop()
    assert info["name"] == which and info["classes"] == ["background", "cells", "nuclei"]
    for mask, image in zip(masks, images):
        np.testing.assert_array_equal(mask, reference_mask(net, image))
    assert v2.status_code == 200, v2.text
    out = v2.json()["outputs"][0]
    assert out["name"] == "MASK" and out["shape"] == [2, h, w]
    got = np.array(out["data"], dtype=np.uint8).reshape(2, h, w)
    for mask, image in zip(got, stacked):
        np.testing.assert_array_equal(mask, reference_mask(net, image))
