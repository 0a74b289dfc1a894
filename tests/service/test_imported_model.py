"""A model nobody here wrote, imported with the CLI and served by a real
``python -m service``: the masks over HTTP (``/predict`` and v2) are the argmax
of the original module's logits, computed here, at each image's own size."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.model.test_import import ROOT, monai_models, reference_mask, scripted
from tests.service.conftest import ServerProcess, served_masks

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
    server = ServerProcess(str(artifact), tmp_path)
    try:
        server.wait_ready()
        info, images, masks, stacked, v2 = served_masks(server, which)
    finally:
        server.stop()
    h, w = stacked.shape[1:3]
    assert info["name"] == which and info["classes"] == ["background", "cells", "nuclei"]
    for mask, image in zip(masks, images):
        np.testing.assert_array_equal(mask, reference_mask(net, image))
    assert v2.status_code == 200, v2.text
    out = v2.json()["outputs"][0]
    assert out["name"] == "MASK" and out["shape"] == [2, h, w]
    got = np.array(out["data"], dtype=np.uint8).reshape(2, h, w)
    for mask, image in zip(got, stacked):
        np.testing.assert_array_equal(mask, reference_mask(net, image))
