"""Keras models into chanseg artifacts (``python -m model import model.keras``): real
Keras 3 models on its torch backend (``tests/keras_models.py``, random weights), their
parity with Keras proven and recorded, their masks Keras's own, and the clear refusals
of what cannot be converted, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import model
from model.imported import ModelImportError
from model.keras_import import import_keras
from model.keras_unet import keras_channel_attention_unet, torch_state_dict
from model.parity import TOLERANCE, Batch, Proof, held, measure
from tests.keras_models import (
    encoder_decoder,
    keras_mask,
    need_keras,
    randomize,
    seed_unet,
    softmax_head,
)

pytestmark = pytest.mark.real_part("keras 3 (torch backend)")  # the keras extra; dev has it
ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["background", "cell", "nucleus"]


@pytest.fixture(scope="module")
def keras():
    return need_keras()


@pytest.mark.parametrize("negative_slope, complementary", [(0.0, False), (0.01, True)])
def test_the_keras_twin_computes_what_the_network_computes(keras, negative_slope, complementary):
    """model.keras_unet's twin, its weights mapped into ChannelAttentionUNet (HWIO -> OIHW,
    Dense transposed, batch-norm statistics), gives the same logits."""
    config = model.ModelConfig(
        widths=(4, 8, 16), num_classes=3, class_names=tuple(CLASSES), input_size=(64, 64),
        negative_slope=negative_slope, complementary=complementary,
    )  # fmt: skip
    twin = randomize(keras_channel_attention_unet(config), seed=5)
    net = model.ChannelAttentionUNet(config).eval()
    missing, unexpected = net.load_state_dict(torch_state_dict(twin), strict=False)
    assert unexpected == [] and all(k.endswith("num_batches_tracked") for k in missing)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want = twin(x.permute(0, 2, 3, 1), training=False).permute(0, 3, 1, 2)
        torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)


# name -> (Keras model builder, how it is saved, the head the import reports)
MODELS = {
    "seed-unet": (lambda: seed_unet((8, 16)), "keras", "logits"),
    "encoder-decoder": (encoder_decoder, "keras", "logits"),
    "softmax": (softmax_head, "keras", "softmax-removed"),
    "seed-weights": (lambda: seed_unet((8, 16), seed=3), "weights", "logits"),
}


@pytest.fixture(scope="module")
def imported(keras, tmp_path_factory):
    """Each model saved by Keras and imported: ``{name: (keras model, artifact)}``."""
    work = tmp_path_factory.mktemp("keras")
    done = {}
    for name, (build, saved, _) in MODELS.items():
        kmodel = build()
        if saved == "keras":
            source = work / f"{name}.keras"
            kmodel.save(source)
            out = import_keras(source, work / f"{name}.pt", CLASSES, (64, 64))
        else:
            source = work / f"{name}.weights.h5"
            kmodel.save_weights(source)
            out = import_keras(source, work / f"{name}.pt", CLASSES, (64, 64), widths=(8, 16))
        done[name] = (kmodel, out)
    return done


@pytest.mark.parametrize("name", MODELS)
def test_parity_is_proven_and_recorded(imported, name):
    kmodel, out = imported[name]
    artifact = model.read_artifact(out)
    parity = artifact.meta["parity"]
    assert parity["max_abs_diff"] <= TOLERANCE and parity["tolerance"] == TOLERANCE
    assert parity["masks_identical"] and parity["mask_pixels_differing"] == 0
    assert parity["sizes"] == [[64, 64], [128, 128]]
    assert [(c["size"], c["batch"]) for c in parity["checked"]] == [
        ([64, 64], 3),
        ([64, 64], 1),
        ([128, 128], 1),
    ]
    assert parity["head"] == MODELS[name][2] and parity["seconds"] > 0
    assert parity["reference"].startswith(f"keras {need_keras().__version__}, torch backend")
    if name == "softmax":
        assert parity["probabilities_max_abs_diff"] <= TOLERANCE
        assert "softmax removed" in parity["head_detail"]
    weights_only = MODELS[name][1] == "weights"
    assert artifact.config.network == ("channel-attention-unet" if weights_only else "imported")
    if weights_only:
        assert artifact.config.widths == (8, 16) and artifact.config.negative_slope == 0.0
        assert "ReLU (the seed's)" in parity["head_detail"]
    assert artifact.config.mean == (0.0, 0.0, 0.0) and artifact.config.std == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("name", MODELS)
def test_masks_are_keras_own_argmax_at_any_image_size(imported, name):
    kmodel, out = imported[name]
    seg = model.load(out, device="cpu")
    assert seg.class_names == tuple(CLASSES) and tuple(seg.config.input_size) == (64, 64)
    rng = np.random.default_rng(4)
    for shape in ((64, 64, 3), (90, 130, 3), (37, 200, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(seg.predict(image), keras_mask(kmodel, image))


def _tiny(keras, last, channels=3, fixed=None):
    """A one-convolution model whose head is ``last(x)`` (a layer or a function of x)."""
    inputs = keras.Input((*(fixed or (None, None)), 3))
    x = keras.layers.Conv2D(channels, 3, padding="same")(inputs)
    return randomize(keras.Model(inputs, last(x)), 7)


@pytest.mark.parametrize(
    "head, channels, threshold, code",
    [
        ("conv-softmax", 3, None, "softmax-removed"),
        ("softmax-layer", 3, None, "softmax-removed"),
        ("sigmoid-1", 1, 0.5, "sigmoid-removed"),
        ("sigmoid-3", 3, None, "sigmoid-removed"),
        ("linear-1", 1, 0.0, "logits"),
        ("probabilities", 3, None, "probabilities-log"),
    ],
)
def test_heads_become_logits_and_keep_keras_masks(keras, tmp_path, head, channels, threshold, code):
    """A softmax or sigmoid the final layer says it has is removed (exact logits); one
    channel x becomes [0, x]; probabilities no layer names (a custom layer's softmax) are
    taken as they are, their log the logits."""
    layers = keras.layers
    if head == "conv-softmax":
        inputs = keras.Input((None, None, 3))
        kmodel = randomize(
            keras.Model(inputs, layers.Conv2D(3, 3, padding="same", activation="softmax")(inputs)), 7
        )
    else:
        last = {
            "softmax-layer": layers.Softmax(),
            "sigmoid-1": layers.Activation("sigmoid"),
            "sigmoid-3": layers.Activation("sigmoid"),
            "linear-1": lambda x: x,
            "probabilities": _SoftmaxInside(),
        }[head]
        kmodel = _tiny(keras, last, channels)
    source = tmp_path / f"{head}.keras"
    kmodel.save(source)
    classes = ["background", "thing"] if channels == 1 else CLASSES
    out = import_keras(source, tmp_path / "out.pt", classes, (48, 48))
    parity = model.read_artifact(out).meta["parity"]
    assert parity["head"] == code and parity["masks_identical"], parity
    assert parity["max_abs_diff"] <= TOLERANCE
    if code != "logits":
        assert parity["probabilities_max_abs_diff"] <= TOLERANCE
    seg = model.load(out, device="cpu")
    image = np.random.default_rng(5).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(seg.predict(image), keras_mask(kmodel, image, (48, 48), threshold))


def _register_softmax_inside():
    keras = need_keras()

    @keras.saving.register_keras_serializable(package="chanseg_tests")
    class SoftmaxInside(keras.layers.Layer):
        """Probabilities from a layer of one's own: nothing says softmax but the values."""

        def call(self, x):
            return keras.ops.softmax(x * 1.0, axis=-1)

    return SoftmaxInside


def _SoftmaxInside():
    return _register_softmax_inside()()


def test_the_cli_imports_weights_and_info_shows_the_parity(keras, tmp_path):
    """``python -m model import x.weights.h5`` (the seed's blocks with LeakyReLU) prints the
    parity report; ``python -m model info`` shows it from the artifact."""
    source = tmp_path / "leaky.weights.h5"
    seed_unet((4, 8, 16), classes=2, act="leaky", seed=6).save_weights(source)
    out = tmp_path / "leaky.pt"
    done = subprocess.run(
        [sys.executable, "-m", "model", "import", str(source), "--classes", "background,lesion",
         "--widths", "4", "8", "16", "--negative-slope", "0.01", "--input-size", "32", "32", "-o", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "parity with keras" in done.stdout and "masks identical: yes" in done.stdout, done.stdout
    assert "LeakyReLU(0.01)" in done.stdout and "imported in" in done.stdout
    info = subprocess.run(
        [sys.executable, "-m", "model", "info", "--model", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    shown = json.loads(info.stdout)
    assert shown["name"] == "leaky" and shown["imported_from"] == "leaky.weights.h5"
    assert shown["parity"]["max_abs_diff"] <= TOLERANCE and shown["parity"]["masks_identical"]
    assert shown["parity"]["sizes"] == [[32, 32], [64, 64]]
    assert shown["config"]["negative_slope"] == 0.01 and shown["config"]["widths"] == [4, 8, 16]


def test_a_legacy_h5_model_imports_like_a_keras_file(keras, tmp_path):
    """An .h5 that holds the architecture (Keras 2's model.save) is a whole model; the
    options that describe chanseg's network for weights only are refused for it."""
    kmodel = softmax_head(seed=8)
    kmodel.save(tmp_path / "legacy.h5")
    with pytest.raises(ModelImportError, match=r"whole Keras model: --widths.*weights only"):
        import_keras(tmp_path / "legacy.h5", tmp_path / "out.pt", CLASSES, (64, 64), widths=(8, 16))
    out = import_keras(tmp_path / "legacy.h5", tmp_path / "out.pt", CLASSES, (64, 64))
    artifact = model.read_artifact(out)
    assert artifact.name == "legacy" and artifact.meta["imported_from"] == "legacy.h5"
    assert artifact.meta["parity"]["head"] == "softmax-removed" and artifact.meta["parity"]["masks_identical"]
    image = np.random.default_rng(9).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    np.testing.assert_array_equal(model.load(out, device="cpu").predict(image), keras_mask(kmodel, image))


def test_an_artifact_serves_where_keras_cannot_be_imported(imported):
    """The artifact is plain TorchScript: loaded and run in a process that cannot import Keras."""
    _, out = imported["softmax"]
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["keras"] = None  # import keras now raises ImportError
        import numpy as np, model
        seg = model.load({str(out)!r}, device="cpu")
        print(seg.predict(np.zeros((40, 30, 3), np.uint8)).shape)
        assert not any(m == "keras" or m.startswith("keras.") for m in sys.modules if sys.modules[m] is not None)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "(40, 30)", done.stderr


# -- refusals -------------------------------------------------------------------------


def _saved(kmodel, path: Path) -> Path:
    kmodel.save(path)
    return path


def test_files_keras_cannot_read_are_refused(keras, tmp_path):
    out = tmp_path / "out.pt"
    cases = [(tmp_path / "nothing.keras", r"no such file")]
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    cases.append((tmp_path / "junk.keras", r"not a Keras 3 \.keras file.*model\.save"))
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as z:
        z.writestr("hello.txt", "not a model")
    cases.append((tmp_path / "other.keras", r"no config\.json"))
    (tmp_path / "saved_model.pb").write_bytes(b"")
    cases.append((tmp_path / "saved_model.pb", r"not a Keras file"))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    cases.append((tmp_path / "junk.h5", r"not an HDF5 file"))
    for source, message in cases:
        with pytest.raises(ModelImportError, match=message):
            import_keras(source, out, CLASSES, (64, 64))
    assert not out.exists()


def test_models_that_are_not_segmentation_models_are_refused(keras, tmp_path):
    layers = keras.layers
    inputs = keras.Input((None, None, 3))
    conv = layers.Conv2D(3, 3, padding="same")(inputs)
    classifier = keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(conv)))
    half = keras.Model(inputs, layers.MaxPooling2D(2)(conv))
    two = keras.Model(inputs, [conv, layers.Conv2D(2, 1)(conv)])
    fixed_in = keras.Input((64, 64, 3))
    fixed = keras.Model(fixed_in, layers.Conv2D(3, 1)(fixed_in))
    gray_in = keras.Input((None, None, 1))
    gray = keras.Model(gray_in, layers.Conv2D(3, 1)(gray_in))
    out = tmp_path / "out.pt"
    cases = [
        (classifier, CLASSES, (64, 64), r"\(2, 3\) for a \(2, 64, 64, 3\) batch: a classifier"),
        (half, CLASSES, (64, 64), r"32x32 for a 64x64 input"),
        (two, CLASSES, (64, 64), r"2 outputs"),
        (keras.Model(inputs, conv), ["a", "b"], (64, 64), r"3 output channels but 2 class names"),
        (keras.Model(inputs, conv), CLASSES, None, r"any image size.*--input-size H W"),
        (fixed, CLASSES, (96, 96), r"takes 64x64 images: --input-size 96 96 does not fit"),
        (gray, CLASSES, (64, 64), r"RGB images"),
    ]
    for i, (kmodel, classes, size, message) in enumerate(cases):
        with pytest.raises(ModelImportError, match=message):
            import_keras(_saved(kmodel, tmp_path / f"m{i}.keras"), out, classes, size)
    assert not out.exists()
    # A model fixing its input needs no --input-size, and is checked at its one size.
    parity = model.read_artifact(import_keras(_saved(fixed, tmp_path / "f.keras"), out, CLASSES)).meta[
        "parity"
    ]
    assert parity["sizes"] == [[64, 64]] and "fixes its input at 64x64" in parity["note"]


CUSTOM = """
import keras

@keras.saving.register_keras_serializable(package="chanseg_tests")
class Doubled(keras.layers.Layer):
    def call(self, x):
        return x * 2.0
"""

BRANCHING = """
import keras

@keras.saving.register_keras_serializable(package="chanseg_tests")
class Branching(keras.layers.Layer):
    def call(self, x):
        if keras.ops.mean(x) > 0:  # a Python decision on a tensor's value
            return x
        return -x
"""


def _custom_model(keras, tmp_path: Path, code: str, cls: str) -> Path:
    """A model with a custom layer, saved; the layer then unregistered (its code "not here")."""
    namespace: dict = {}
    exec(code, namespace)
    inputs = keras.Input((None, None, 3))
    kmodel = keras.Model(inputs, keras.layers.Conv2D(3, 1)(namespace[cls]()(inputs)))
    path = _saved(kmodel, tmp_path / f"{cls}.keras")
    del keras.saving.get_custom_objects()[f"chanseg_tests>{cls}"]
    (tmp_path / f"{cls}.py").write_text(code)
    return path


def test_custom_layers_need_their_code_and_python_branches_are_refused(keras, tmp_path):
    out = tmp_path / "out.pt"
    custom = _custom_model(keras, tmp_path, CUSTOM, "Doubled")
    with pytest.raises(
        ModelImportError, match=r"uses 'Doubled', whose code is not here.*--keras-module FILE"
    ):
        import_keras(custom, out, CLASSES, (64, 64))
    assert not out.exists()
    import_keras(custom, out, CLASSES, (64, 64), keras_modules=[tmp_path / "Doubled.py"])
    assert model.read_artifact(out).meta["parity"]["masks_identical"]
    out.unlink()
    branching = _custom_model(keras, tmp_path, BRANCHING, "Branching")
    with pytest.raises(ModelImportError, match=r"decides on a tensor's value in Python at .*Branching\.py:7"):
        import_keras(branching, out, CLASSES, (64, 64), keras_modules=[tmp_path / "Branching.py"])
    inputs = keras.Input((None, None, 3))
    lam = keras.Model(inputs, keras.layers.Conv2D(3, 1)(keras.layers.Lambda(lambda t: t * 2)(inputs)))
    with pytest.raises(ModelImportError, match=r"Lambda layer.*--keras-module"):
        import_keras(_saved(lam, tmp_path / "lambda.keras"), out, CLASSES, (64, 64))
    assert not out.exists()


def test_weights_that_do_not_fit_the_network_are_refused(keras, tmp_path):
    source = tmp_path / "w.weights.h5"
    seed_unet((4, 8), classes=3).save_weights(source)
    out = tmp_path / "out.pt"
    with pytest.raises(ModelImportError, match=r"holds 82 weight arrays; .*widths \[4, 8, 16\].*--widths"):
        import_keras(source, out, CLASSES, (64, 64), widths=(4, 8, 16))
    with pytest.raises(ModelImportError, match=r"do not fit .*widths \[8, 16\].*expects \(3, 3, 3, 8\)"):
        import_keras(source, out, CLASSES, (64, 64), widths=(8, 16))
    with pytest.raises(ModelImportError, match=r"do not fit .* 2 classes.*'classifier'"):
        import_keras(source, out, ["a", "b"], (64, 64), widths=(4, 8))
    with pytest.raises(ModelImportError, match=r"input_size \(60, 61\) must be multiples of 2"):
        import_keras(source, out, CLASSES, (60, 61), widths=(4, 8))
    assert not out.exists()
    done = subprocess.run(  # the CLI: one line, status 2, no traceback, nothing written
        [sys.executable, "-m", "model", "import", str(source), "--classes", "a,b", "--widths", "4", "8",
         "-o", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "do not fit" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_a_model_over_the_tolerance_is_refused():
    """The check itself: logits off by 1e-3, or a batch the converted model cannot run."""
    x = torch.randn(2, 3, 8, 8)
    logits = torch.randn(2, 3, 8, 8)
    proof = Proof("keras 3, torch backend", [Batch((8, 8), x, logits, logits.argmax(1))])
    report = measure(lambda _: logits + 1e-3, proof)
    assert report["masks_identical"] and report["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(
        ModelImportError, match=r"differs from keras 3, torch backend by 0.001 .*nothing was written"
    ):
        held(report, "the traced model")
    held(measure(lambda _: logits, proof), "the traced model")

    def fixed_batch(t):  # what a trace that baked in its batch of 2 does
        return t.reshape(2, 3, 8, 8)

    with pytest.raises(
        ModelImportError, match=r"fails on a 8x8 batch of 1 where the source runs .*a shape was fixed"
    ):
        measure(fixed_batch, Proof("k", [Batch((8, 8), x[:1], logits[:1], logits[:1].argmax(1))]))
