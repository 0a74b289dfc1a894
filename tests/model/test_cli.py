"""python -m model export / info / predict."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image
from safetensors.torch import save_file

from model.__main__ import main
from tests.conftest import TINY


def test_export_info_predict(tmp_path, tiny_net, capsys):
    weights, config = tmp_path / "w.safetensors", tmp_path / "c.json"
    save_file({k: v.contiguous() for k, v in tiny_net.state_dict().items()}, str(weights))
    config.write_text(TINY.to_json())
    artifact = tmp_path / "tiny.pt"
    assert main(["export", "--weights", str(weights), "--config", str(config), "--out", str(artifact),
                 "--version", "5"]) == 0  # fmt: skip
    capsys.readouterr()

    assert main(["info", "--model", str(artifact)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "tiny" and info["version"] == "5"
    assert info["config"]["widths"] == list(TINY.widths)

    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(artifact), "--device", "cpu", str(image), "--out", str(out)]) == 0
    mask = Image.open(out / "in.mask.png")
    assert mask.mode == "P" and mask.size == (70, 50)
    assert np.asarray(mask).max() < 4
    assert Image.open(out / "in.overlay.png").size == (70, 50)


def test_bad_model_path_is_a_clear_error_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("nope")
    result = subprocess.run(
        [sys.executable, "-m", "model", "info", "--model", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "bad.pt" in result.stderr
    assert "Traceback" not in result.stderr
