"""Serving someone else's model: ``python -m model import`` on networks nobody here
wrote (MONAI's, random weights, nothing downloaded), and the clear refusals of
modules that cannot be served as segmentation models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import model
from model.export import script
from model.imported import ModelImportError, import_torchscript

monai_nets = pytest.importorskip("monai.networks.nets", reason="monai is in the dev extra")

ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def monai_models() -> dict:
    torch.manual_seed(0)
    return {
        "unet": monai_nets.UNet(
            spatial_dims=2, in_channels=3, out_channels=3, channels=(8, 16, 32), strides=(2, 2)
        ),
        "basicunet": monai_nets.BasicUNet(
            spatial_dims=2, in_channels=3, out_channels=3, features=(8, 8, 16, 32, 64, 8)
        ),
        "segresnet": monai_nets.SegResNet(spatial_dims=2, in_channels=3, out_channels=3, init_filters=8),
    }


def reference_mask(net: nn.Module, image: np.ndarray, size=(64, 64)) -> np.ndarray:
    """What the user's own code computes: the image resized (PIL bilinear, as chanseg
    does), normalised, the original module's logits, argmax, upsampled (nearest) to
    the image's size."""
    from model.preprocess import prepare_image

    x = torch.from_numpy(np.array(prepare_image(image, size))).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        labels = net.eval()(x).argmax(1, keepdim=True).to(torch.uint8)
    return F.interpolate(labels, size=image.shape[:2], mode="nearest-exact")[0, 0].numpy()


def scripted(net: nn.Module, path: Path) -> Path:
    torch.jit.save(script(net.eval()), str(path))
    return path


@pytest.mark.parametrize("which", ["unet", "basicunet", "segresnet"])
def test_imported_models_predict_what_their_own_logits_say(which, tmp_path):
    net = monai_models()[which]
    source = scripted(net, tmp_path / f"{which}.ts")
    out = tmp_path / f"{which}.pt"
    done = subprocess.run(
        [sys.executable, "-m", "model", "import", str(source), "--classes", "background,cells,nuclei",
         "--input-size", "64", "64", "--name", which, "-o", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seg = model.load(out, device="cpu")
    assert seg.name == which and seg.class_names == ("background", "cells", "nuclei")
    assert seg.config.network == "imported" and seg.meta["imported_from"] == f"{which}.ts"
    rng = np.random.default_rng(1)
    for shape in ((64, 64, 3), (90, 130, 3), (37, 200, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(seg.predict(image), reference_mask(net, image))


class DictOutput(nn.Module):
    """A model that answers as torchvision's segmentation models do: {"out", "aux"}."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = self.inner(x)
        return {"out": y, "aux": y * 0.5}


def test_dict_outputs_need_and_take_an_output_key(tmp_path):
    net = DictOutput(monai_models()["unet"])
    source = scripted(net, tmp_path / "dict.ts")
    with pytest.raises(ModelImportError, match=r"dict with keys \['aux', 'out'\].*--output-key"):
        import_torchscript(source, tmp_path / "x.pt", ["a", "b", "c"], (64, 64))
    with pytest.raises(ModelImportError, match="'logits' one of its outputs"):
        import_torchscript(source, tmp_path / "x.pt", ["a", "b", "c"], (64, 64), output_key="logits")
    out = import_torchscript(source, tmp_path / "ok.pt", ["a", "b", "c"], (64, 64), output_key="out")
    image = np.random.default_rng(2).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        model.load(out, device="cpu").predict(image), reference_mask(net.inner, image)
    )


class Classifier(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


class HalfSize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, 2)


def test_modules_that_do_not_fit_are_refused_before_anything_is_written(tmp_path):
    unet = scripted(monai_models()["unet"], tmp_path / "unet.ts")
    cases = [
        (unet, ["a", "b"], r"3 output channels but 2 class names"),
        (scripted(Classifier(), tmp_path / "cls.ts"), ["a", "b", "c"], r"\(2, 3\).*classifier"),
        (scripted(HalfSize(), tmp_path / "half.ts"), ["a", "b", "c"], r"\(32, 32\) for a 64x64 input"),
    ]
    for source, classes, message in cases:
        with pytest.raises(ModelImportError, match=message):
            import_torchscript(source, tmp_path / "out.pt", classes, (64, 64))
    not_ts = tmp_path / "weights.pth"
    torch.save(monai_models()["unet"].state_dict(), not_ts)
    with pytest.raises(ModelImportError, match="not a loadable TorchScript file.*torch.jit.script"):
        import_torchscript(not_ts, tmp_path / "out.pt", ["a", "b", "c"], (64, 64))
    (tmp_path / "junk.ts").write_bytes(b"not a model")
    with pytest.raises(ModelImportError, match="not a TorchScript file"):
        import_torchscript(tmp_path / "junk.ts", tmp_path / "out.pt", ["a", "b", "c"], (64, 64))
    assert not (tmp_path / "out.pt").exists()
    done = subprocess.run(  # the CLI: a clear one-line error and status 2, no traceback
        [sys.executable, "-m", "model", "import", str(unet), "--classes", "a,b", "--input-size", "64", "64",
         "-o", str(tmp_path / "out.pt")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "3 output channels but 2 class names" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_artifact_is_not_imported_twice(tiny_artifact, tmp_path):
    with pytest.raises(ModelImportError, match="already a chanseg artifact"):
        import_torchscript(tiny_artifact, tmp_path / "out.pt", ["a", "b", "c", "d"], (32, 32))


def test_an_imported_model_is_not_rebuilt_for_compiling(tmp_path):
    out = import_torchscript(
        scripted(monai_models()["unet"], tmp_path / "u.ts"), tmp_path / "u.pt", ["a", "b", "c"], (64, 64)
    )
    with pytest.raises(model.ModelLoadError, match="imported model"):
        model.export.build_network(model.read_artifact(out).config)


@pytest.mark.slow
def test_an_imported_model_compiles_to_a_package(tmp_path):
    """torch.export + AOTInductor for an imported model: its traced TorchScript is
    converted (torch's TorchScript converter), compiled in fp32, checked against the
    TorchScript artifact, and loads and predicts like it; a scripted model with loops
    is refused with what to do instead."""
    torch.manual_seed(0)
    net = monai_nets.UNet(spatial_dims=2, in_channels=3, out_channels=3, channels=(4, 8), strides=(2,)).eval()
    traced = tmp_path / "traced.ts"
    torch.jit.save(torch.jit.trace(net, torch.randn(2, 3, 32, 32)), str(traced))
    artifact = import_torchscript(traced, tmp_path / "traced.pt", ["a", "b", "c"], (32, 32), name="traced")
    package = tmp_path / "traced.pt2"
    done = subprocess.run(
        [sys.executable, "-m", "model", "compile", "--model", str(artifact), "--out", str(package), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["agreement_with_torchscript"] >= 0.999
    compiled = model.load(package, device="cpu", precision="auto")
    assert (
        compiled.format == "package" and compiled.name == "traced" and compiled.class_names == ("a", "b", "c")
    )
    reference = model.load(artifact, device="cpu")
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(5)]
    agree = np.mean([(a == b).mean() for a, b in zip(compiled.predict(images), reference.predict(images))])
    assert agree >= 0.999
    scripted_with_loops = import_torchscript(
        scripted(monai_models()["unet"], tmp_path / "s.ts"), tmp_path / "s.pt", ["a", "b", "c"], (64, 64)
    )
    done = subprocess.run(
        [sys.executable, "-m", "model", "compile", "--model", str(scripted_with_loops), "--out", str(tmp_path / "s.pt2")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2 and "torch.jit.trace" in done.stderr and "Traceback" not in done.stderr


def test_a_version_or_name_a_server_cannot_send_is_refused_before_anything_is_read(tmp_path):
    source = tmp_path / "any.ts"
    source.write_bytes(b"not even read")
    with pytest.raises(ModelImportError, match="model version '1.0\u2013rc1': use letters"):
        import_torchscript(source, tmp_path / "out.pt", ["a", "b"], (64, 64), version="1.0\u2013rc1")
    out = subprocess.run(
        [sys.executable, "-m", "model", "import", str(source), "--classes", "a,b", "--input-size", "64", "64",
         "--name", "my model", "-o", str(tmp_path / "out.pt")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode != 0 and "model name 'my model': use letters" in out.stderr, out.stderr
    assert not (tmp_path / "out.pt").exists()
