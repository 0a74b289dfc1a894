"""Keras models imported with the command line and served by a real ``python -m service``
in which Keras cannot be imported: the masks over HTTP (``/predict`` and v2) are the
argmax of Keras's own outputs, computed here, at each image's own size."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.keras_models import encoder_decoder, keras_mask, need_keras, seed_unet, softmax_head
from tests.service.conftest import ServerProcess, png_bytes, served_masks

pytestmark = [
    pytest.mark.slow,
    pytest.mark.real_part("keras 3 (torch backend)"),
]  # real servers: make test-all

ROOT = Path(__file__).resolve().parents[2]
CLASSES = "background,cell,nucleus"
# name -> (builder, saved as, extra import options); the seed's U-Net both whole and as weights only
MODELS = {
    "seed-unet": (lambda: seed_unet((8, 16)), ".keras", []),
    "seed-weights": (lambda: seed_unet((8, 16), seed=3), ".weights.h5", ["--widths", "8", "16"]),
    "encoder-decoder": (encoder_decoder, ".keras", []),
    "softmax": (softmax_head, ".keras", []),
}


@pytest.fixture(scope="module")
def no_keras(tmp_path_factory) -> str:
    """A PYTHONPATH on which ``import keras`` fails, then the source tree."""
    blocker = tmp_path_factory.mktemp("no-keras")
    (blocker / "keras").mkdir()
    (blocker / "keras" / "__init__.py").write_text(
        'raise ImportError("Keras is made unimportable here: serving an imported model must not need it")\n'
    )
    return f"{blocker}:{ROOT}"


@pytest.mark.parametrize("name", MODELS)
def test_a_keras_model_is_served_without_keras(name, no_keras, tmp_path):
    need_keras()
    build, suffix, options = MODELS[name]
    kmodel = build()
    source = tmp_path / f"{name}{suffix}"
    kmodel.save_weights(source) if suffix == ".weights.h5" else kmodel.save(source)
    artifact = tmp_path / f"{name}.pt"
    # `chanseg import` (the installed command) for one of them, `python -m model import` for the rest
    command = (
        [str(Path(sys.executable).parent / "chanseg")]
        if name == "softmax"
        else [sys.executable, "-m", "model"]
    )
    done = subprocess.run(
        [*command, "import", str(source), "--classes", CLASSES, "--input-size", "64", "64", *options,
         "-o", str(artifact)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "masks identical: yes" in done.stdout, done.stdout
    server = ServerProcess(str(artifact), tmp_path, PYTHONPATH=no_keras)
    try:
        server.wait_ready()
        info, images, masks, stacked, v2 = served_masks(server, name)
        multipart = httpx.post(
            server.url + "/predict", files={"file": ("a.png", png_bytes(images[1]), "image/png")}
        )
    finally:
        server.stop()
    h, w = stacked.shape[1:3]
    assert info["name"] == name and info["classes"] == CLASSES.split(",")
    for mask, image in zip(masks, images):
        np.testing.assert_array_equal(mask, keras_mask(kmodel, image))
    assert multipart.status_code == 200, multipart.text
    png = base64.b64decode(multipart.json()["predictions"][0]["mask_png"])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), keras_mask(kmodel, images[1]))
    assert v2.status_code == 200, v2.text
    out = v2.json()["outputs"][0]
    assert out["name"] == "MASK" and out["shape"] == [2, h, w]
    got = np.array(out["data"], dtype=np.uint8).reshape(2, h, w)
    for mask, image in zip(got, stacked):
        np.testing.assert_array_equal(mask, keras_mask(kmodel, image))
