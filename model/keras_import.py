"""Keras models as chanseg artifacts: Keras 3 on its torch backend, parity proven at import.

``import_keras`` (``python -m model import model.keras``) takes one of two things:

- **A whole model** (``.keras``, or a legacy ``.h5`` that holds its architecture):
  loaded with Keras 3 on the torch backend (no TensorFlow), where its layers are torch
  modules; wrapped to take chanseg's ``(N, 3, H, W)`` floats (Keras is channels-last)
  and to return logits ``(N, C, H, W)``; traced to TorchScript at the input size and
  imported like any TorchScript model (:func:`~model.imported.import_torchscript`).
  A final softmax or sigmoid is *removed* (the final layer's activation set to linear:
  its logits, exact) where the final layer says it has one; outputs that are
  probabilities without such a layer are taken as they are and their log becomes the
  logits (argmax unchanged). One sigmoid (or linear) channel ``x`` becomes two classes
  ``[0, x]``.
- **Weights only** (``.weights.h5``, or an ``.h5`` without an architecture) of chanseg's
  own network, the seed's ``Channelblock`` U-Net (:mod:`model.keras_unet`): loaded into
  its Keras twin by Keras itself, mapped into :class:`~model.network.ChannelAttentionUNet`
  and exported like the bundled model (scripted, compilable).

Either way, before anything is written, the artifact's logits are compared with
Keras's own on synthetic images at two sizes (the input size, as one batch of 3 and
as a batch of 1, and a larger size; one size when the Keras model fixes its input):
the largest absolute difference must stay under :data:`model.parity.TOLERANCE` (1e-4, fp32), and the
report (sizes, differences, whether the masks are identical, what was done to the
head, the import's duration) goes into the artifact's metadata as ``parity``, where
``python -m model info`` shows it. What cannot be converted is refused with
:class:`~model.imported.ModelImportError`, saying what to do: a file Keras cannot
read, custom layers whose code is missing, Python control flow on tensor values,
more than one input or output, an output that is not ``(N, H, W, C)`` at the input
size, a class count that does not match, weights that do not fit the network.

Keras is imported inside the functions: ``import model`` and the server never need it,
and an imported artifact is plain TorchScript.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .data import synthetic_sample
from .imported import ModelImportError, import_torchscript
from .keras_trace import KerasLogits, check_output, head_of, remove_activation, trace
from .keras_unet import import_weights
from .network import ModelConfig, check_identifier
from .parity import PARITY_SEED, Batch, Proof, first_line, synthetic_inputs, write_proven
from .preprocess import normalize

__all__ = ["import_keras", "is_keras_file", "KERAS_MEAN", "KERAS_STD"]

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
# Keras models are usually fed pixels scaled to [0, 1] (x / 255): their default normalisation.
KERAS_MEAN, KERAS_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def is_keras_file(path: str | os.PathLike) -> bool:
    """Whether ``python -m model import`` reads ``path`` with Keras (by its suffix)."""
    return Path(path).suffix.lower() in KERAS_SUFFIXES


def import_keras(
    source: str | os.PathLike,
    out: str | os.PathLike,
    class_names: Sequence[str],
    input_size: Optional[Sequence[int]] = None,
    mean: Sequence[float] = KERAS_MEAN,
    std: Sequence[float] = KERAS_STD,
    name: Optional[str] = None,
    version: str = "1",
    widths: Optional[Sequence[int]] = None,
    negative_slope: Optional[float] = None,
    complementary: bool = False,
    keras_modules: Sequence[str | os.PathLike] = (),
) -> Path:
    """A Keras model (``.keras``, ``.h5``) or chanseg's network's Keras weights
    (``.weights.h5``) into a chanseg artifact at ``out``, its parity with Keras proven.

    Args:
        source: the Keras file.
        out: the artifact to write (nothing is written when the import is refused).
        class_names: one per output channel (two for a one-channel output), background first.
        input_size: ``(height, width)`` images are resized to; default: the Keras model's
            own input size when it fixes one, 256x256 for weights only.
        mean, std: per-channel normalisation of pixels scaled to [0, 1]; default: none
            (the model sees x / 255).
        name: the model's name for servers (default: the file's stem).
        widths, negative_slope, complementary: weights only, the network they belong to
            (``ModelConfig``'s fields; ``negative_slope`` 0, the default, is the seed's ReLU).
        keras_modules: Python files run before loading: they define and register
            (``keras.saving.register_keras_serializable``) the model's custom layers.

    Returns:
        The path written; its metadata holds ``parity`` (see the module docstring).

    Raises:
        ModelImportError: the file cannot be converted (the message says why and what to do).
    """
    started = time.perf_counter()
    source = Path(source)
    stem = source.name.removesuffix(".h5").removesuffix(".weights") if source.suffix == ".h5" else source.stem
    name = name or stem
    try:
        check_identifier("version", version)
        check_identifier("name", name)
    except ValueError as exc:
        hint = " (the file's name: give one with --name)" if name == stem else ""
        raise ModelImportError(f"{exc}{hint}") from None
    if not source.is_file():
        raise ModelImportError(f"{source}: no such file")
    whole = _holds_a_model(source)
    keras = _keras()
    for module in keras_modules:
        _run_module(Path(module))
    with keras.device("cpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras's own chatter while loading; tracing collects its own
        if whole:
            if widths is not None or negative_slope is not None or complementary:
                raise ModelImportError(
                    f"{source} holds a whole Keras model: --widths, --negative-slope and --complementary "
                    "describe chanseg's network for weights only (.weights.h5)"
                )
            described = dict(class_names=class_names, mean=mean, std=std, name=name, network="imported")
            return _import_model(keras, source, out, input_size, described, version, started)
        described = dict(
            class_names=class_names, mean=mean, std=std, name=name, negative_slope=float(negative_slope or 0.0),
            complementary=bool(complementary),
            **({"widths": tuple(int(w) for w in widths)} if widths is not None else {}),
            **({"input_size": tuple(int(s) for s in input_size)} if input_size is not None else {}),
        )  # fmt: skip
        return import_weights(source, out, _config(described), version, started)


def _holds_a_model(source: Path) -> bool:
    """True for a whole model (``.keras``, an ``.h5`` with ``model_config``), False for weights."""
    suffix = source.suffix.lower()
    if suffix == ".keras":
        if not zipfile.is_zipfile(source):
            raise ModelImportError(
                f"{source}: not a Keras 3 .keras file (that is a zip); save the model with model.save('x.keras')"
            )
        with zipfile.ZipFile(source) as archive:
            if "config.json" not in archive.namelist():
                raise ModelImportError(
                    f"{source}: a zip without a Keras model in it (no config.json); "
                    "save the model with model.save('x.keras')"
                )
        return True
    if suffix not in (".h5", ".hdf5"):
        raise ModelImportError(
            f"{source}: not a Keras file (.keras, .h5, .weights.h5); a SavedModel directory must be loaded "
            "and saved again as .keras with Keras 3"
        )
    try:
        import h5py
    except ImportError:
        raise ModelImportError("reading .h5 files needs h5py: pip install 'chanseg[keras]'") from None
    try:
        with h5py.File(source, "r") as f:
            return "model_config" in f.attrs
    except OSError as exc:
        raise ModelImportError(f"{source}: not an HDF5 file ({exc})") from None


def _keras() -> Any:
    """Keras 3 on its torch backend, on the CPU (the trace's constants must be CPU tensors)."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError:
        raise ModelImportError(
            "importing a Keras model needs Keras 3: pip install 'chanseg[keras]' (no TensorFlow needed)"
        ) from None
    version = getattr(keras, "__version__", "0")
    if int(version.split(".")[0]) < 3:
        raise ModelImportError(f"Keras {version} is installed; importing needs Keras 3: pip install -U keras")
    if keras.backend.backend() != "torch":
        raise ModelImportError(
            f"Keras runs on its {keras.backend.backend()} backend in this process; chanseg needs the torch "
            "backend: set KERAS_BACKEND=torch before Keras is imported"
        )
    return keras


def _run_module(path: Path) -> None:
    """Run a Python file that defines (and registers) the model's custom layers."""
    if not path.is_file():
        raise ModelImportError(f"--keras-module {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"chanseg_keras_module_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ModelImportError(f"--keras-module {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelImportError(f"--keras-module {path} fails: {type(exc).__name__}: {exc}") from exc


def _load_model(keras: Any, source: Path) -> Any:
    try:
        return keras.saving.load_model(source, compile=False)
    except Exception as exc:
        text = str(exc)
        missing = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
        if missing:
            raise ModelImportError(
                f"{source} uses {missing.group(1)!r}, whose code is not here: pass the Python file that defines "
                f"it with --keras-module FILE (decorated with @keras.saving.register_keras_serializable)"
            ) from exc
        if "Lambda" in text and "safe_mode" in text:
            raise ModelImportError(
                f"{source} has a Lambda layer holding Python code, which Keras loads only from a file it is told "
                "to trust: write it as a registered layer class and pass its file with --keras-module, or, if "
                "you trust the file, pass a --keras-module that calls keras.config.enable_unsafe_deserialization()"
            ) from exc
        raise ModelImportError(f"Keras cannot load {source}: {first_line(exc)}") from exc


def _input_size(model: Any, given: Optional[Sequence[int]]) -> Tuple[Tuple[int, int], bool]:
    """The size images are resized to, and whether the Keras model fixes it."""
    if len(model.inputs) != 1:
        raise ModelImportError(
            f"the Keras model has {len(model.inputs)} inputs: chanseg feeds one image batch (N, H, W, 3)"
        )
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise ModelImportError(f"the Keras model's input is {shape}: chanseg feeds images (N, H, W, 3)")
    if shape[-1] != 3:
        layout = " (channels first: build it channels-last, Keras's default)" if shape[1] == 3 else ""
        raise ModelImportError(
            f"the Keras model's input is {shape}{layout}: chanseg feeds RGB images (N, H, W, 3)"
        )
    fixed = shape[1] is not None and shape[2] is not None
    if given is not None:
        size = (int(given[0]), int(given[1]))
        if fixed and size != (shape[1], shape[2]):
            raise ModelImportError(
                f"the Keras model takes {shape[1]}x{shape[2]} images: --input-size {size[0]} {size[1]} does not "
                "fit (leave it out)"
            )
        return size, fixed
    if not fixed:
        raise ModelImportError(
            f"the Keras model takes any image size ({shape}): give the size it was trained at, --input-size H W"
        )
    return (int(shape[1]), int(shape[2])), True


def _import_model(
    keras: Any,
    source: Path,
    out: str | os.PathLike,
    input_size: Optional[Sequence[int]],
    described: Dict[str, Any],
    version: str,
    started: float,
) -> Path:
    """A whole Keras model: load, check, undo the head, trace, prove, import the trace."""
    kmodel = _load_model(keras, source)
    size, fixed = _input_size(kmodel, input_size)
    config = _config({**described, "input_size": size})
    h, w = size
    example = synthetic_sample(PARITY_SEED, 100, size).image, synthetic_sample(PARITY_SEED, 101, size).image
    example = normalize(torch.from_numpy(np.stack(example)), config)
    try:
        with torch.no_grad():
            y = kmodel(example.permute(0, 2, 3, 1), training=False)
    except Exception as exc:
        raise ModelImportError(
            f"Keras's own model fails on a (2, {h}, {w}, 3) batch: {first_line(exc)}"
        ) from exc
    channels = check_output(y, size, config.num_classes)
    sums_to_one = bool(
        channels > 1
        and y.min() >= 0
        and y.max() <= 1
        and torch.allclose(y.sum(-1), torch.ones(()), atol=1e-4)
    )
    head = head_of(keras, kmodel, channels, sums_to_one)
    note = (
        f"the Keras model fixes its input at {h}x{w}: checked at that size, batches of 3 and 1"
        if fixed
        else None
    )
    own = []  # Keras's own outputs, before the head is undone
    for at, x in synthetic_inputs(config, second_size=not fixed):
        try:
            own.append((at, x, _keras_nchw(kmodel, x)))
        except Exception as exc:  # it declares any size but does not run at the larger one
            if at == size:
                raise ModelImportError(
                    f"Keras's own model fails on a batch of {x.shape[0]}: {first_line(exc)}"
                ) from exc
            note = f"Keras's own model fails at {at[0]}x{at[1]} ({first_line(exc)}): checked at {h}x{w} only"
    if head.remove is not None:
        remove_activation(keras, head.remove)
    wrapper = KerasLogits(kmodel, head).eval()
    batches = []
    for at, x, y in own:
        with torch.no_grad():
            logits = y if head.unchanged else wrapper(x)
        masks = (y[:, 0] > head.threshold).long() if channels == 1 else y.argmax(1)
        batches.append(Batch(at, x, logits, masks, y if head.was_probabilities else None))
    traced = trace(wrapper, example)
    proof = Proof(
        f"keras {keras.__version__}, torch backend",
        batches,
        head.probabilities if head.was_probabilities else None,
    )
    about = {"head": head.code, "head_detail": head.detail, **({"note": note} if note else {})}
    with tempfile.TemporaryDirectory() as tmp:
        traced_path = Path(tmp) / "traced.ts"
        torch.jit.save(traced, str(traced_path))

        def write(path: Path, parity: Dict[str, Any]) -> Path:
            meta = {"imported_from": source.name, "keras_version": keras.__version__, "parity": parity}
            return import_torchscript(
                traced_path, path, config.class_names, size, mean=config.mean, std=config.std,
                name=config.name, version=version, extra_meta=meta,
            )  # fmt: skip

        return write_proven(write, out, proof, "the traced model", about, started)


def _keras_nchw(kmodel: Any, x: Tensor) -> Tensor:
    """Keras's own output for a normalised ``(N, 3, H, W)`` batch, as ``(N, C, H, W)``."""
    with torch.no_grad():
        return kmodel(x.permute(0, 2, 3, 1), training=False).permute(0, 3, 1, 2)


def _config(fields: Dict[str, Any]) -> ModelConfig:
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        return ModelConfig(num_classes=len(fields["class_names"]), **fields)
    except ValueError as exc:
        raise ModelImportError(f"bad model description: {exc}") from exc
