"""Imported models: someone else's TorchScript segmentation network as a chanseg artifact.

``import_torchscript`` (``python -m model import``) takes a TorchScript file whose
module maps a float ``(N, 3, H, W)`` batch, normalised with the given mean and
std, to logits ``(N, C, H, W)`` at the same height and width (or to a dict that
holds them under ``output_key``, as torchvision's segmentation models return),
checks that on a batch of two before anything is written, and saves it with a
:class:`ModelConfig` (``network="imported"``: class names, input size, mean,
std, name) and metadata, like :func:`export_torchscript`. ``model.load``,
``python -m model predict`` and the server then run it unchanged: frozen,
channels-last on CPU, any precision the device has.

Example (a MONAI U-Net, scripted by its owner)::

    torch.jit.save(torch.jit.script(net.eval()), "unet.ts")
    python -m model import unet.ts --classes background,cell --input-size 256 256 -o unet.pt
    CHANSEG_MODEL_PATH=unet.pt python -m service
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from .artifact import ModelLoadError
from .export import export_torchscript, script
from .network import ModelConfig, check_identifier

# Per-channel normalisation most pretrained encoders expect: an imported model's default.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

__all__ = ["import_torchscript", "exportable", "ModelImportError"]


class ModelImportError(ModelLoadError):
    """The module cannot be served as a segmentation model (the message says why and what to do)."""


class _SelectOutput(nn.Module):
    """Logits from a module that returns a dict of outputs (torchvision: ``out`` and ``aux``)."""

    def __init__(self, inner: torch.jit.ScriptModule, key: str) -> None:
        super().__init__()
        self.inner = inner
        self.key = key

    def forward(self, x: Tensor) -> Tensor:
        outputs: Dict[str, Tensor] = self.inner(x)
        return outputs[self.key]


class _ChannelsLastInput(nn.Module):
    """A module that takes ``(N, H, W, 3)`` (Triton's ``dims: [H, W, 3]``) fed chanseg's ``(N, 3, H, W)``."""

    def __init__(self, inner: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.permute(0, 2, 3, 1).contiguous())


def import_torchscript(
    source: str | os.PathLike,
    out: str | os.PathLike,
    class_names: Sequence[str],
    input_size: Sequence[int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    name: Optional[str] = None,
    version: str = "1",
    output_key: Optional[str] = None,
    channels_last_input: bool = False,
    extra_meta: Optional[Dict[str, object]] = None,
) -> Path:
    """Wrap the TorchScript module in ``source`` into a chanseg artifact at ``out``.

    Args:
        source: a ``torch.jit.save`` file (``torch.jit.script`` or ``torch.jit.trace``).
        class_names: one per output channel, background first by convention.
        input_size: ``(height, width)`` images are resized to before the model.
        mean, std: per-channel normalisation of pixels scaled to [0, 1] (default:
            ImageNet's, what most pretrained encoders expect).
        name: the model's name for servers (default: the file's stem).
        output_key: the key of the logits when the module returns a dict.
        channels_last_input: the module takes ``(N, H, W, 3)`` batches (fed a permuted view).
        extra_meta: more metadata for the artifact (``meta.json``).

    Raises:
        ModelImportError: not TorchScript, already a chanseg artifact, or outputs that do
            not fit (rank, class count, size, a dict without ``output_key``).
    """
    source = Path(source)
    try:  # before anything is read: the name and version a server will send
        check_identifier("version", version)
        check_identifier("name", name or source.stem)
    except ValueError as exc:
        hint = "" if name else " (the file's name: give one with --name)"
        raise ModelImportError(f"{exc}{hint}") from None
    if not source.is_file():
        raise ModelImportError(f"{source}: no such file")
    if not zipfile.is_zipfile(source):
        raise ModelImportError(
            f"{source}: not a TorchScript file; save one with torch.jit.save(torch.jit.script(model))"
        )
    extra = {"config.json": ""}
    try:
        module = torch.jit.load(str(source), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError, ValueError, ... from deep inside
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelImportError(
            f"{source}: not a loadable TorchScript file ({first}); a model saved with torch.save or "
            "torch.export must be scripted or traced first (torch.jit.script / torch.jit.trace, then torch.jit.save)"
        ) from exc
    if extra["config.json"]:
        raise ModelImportError(f"{source} is already a chanseg artifact: serve it as it is")
    try:
        config = ModelConfig(
            num_classes=len(class_names),
            class_names=tuple(class_names),
            input_size=(int(input_size[0]), int(input_size[1])),
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            name=name or source.stem,
            network="imported",
        )
    except ValueError as exc:
        raise ModelImportError(f"bad model description: {exc}") from exc
    module = module.eval()
    if output_key is not None:
        module = script(_SelectOutput(module, output_key))
    if channels_last_input:
        module = script(_ChannelsLastInput(module))
    _check_outputs(module, config, output_key)
    return export_torchscript(
        module,
        out,
        config=config,
        version=version,
        extra_meta={"imported_from": source.name, **(extra_meta or {})},
    )


def _check_outputs(module: torch.jit.ScriptModule, config: ModelConfig, output_key: Optional[str]) -> None:
    """Run a batch of two normalised images at the input size; the logits must be ``(2, C, H, W)``."""
    h, w = config.input_size
    x = torch.zeros(2, 3, h, w)
    try:
        with torch.inference_mode():
            y = module(x)
    except Exception as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in reversed(first) if line.strip()), type(exc).__name__)
        hint = f" (is {output_key!r} one of its outputs?)" if output_key is not None else ""
        raise ModelImportError(f"the model fails on a (2, 3, {h}, {w}) float batch{hint}: {detail}") from exc
    if isinstance(y, dict):
        raise ModelImportError(
            f"the model returns a dict with keys {sorted(y)}: name the logits with --output-key "
            "(torchvision's segmentation models: out)"
        )
    if isinstance(y, (tuple, list)):
        raise ModelImportError(
            f"the model returns a {type(y).__name__} of {len(y)}: chanseg needs one logits tensor"
        )
    if not isinstance(y, Tensor) or y.dim() != 4:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ModelImportError(
            f"the model returns {shape} for a (2, 3, {h}, {w}) batch: chanseg needs logits (N, classes, H, W); "
            "a classifier's (N, classes) is not a segmentation model"
        )
    if y.shape[0] != 2:
        raise ModelImportError(f"the model returns a batch of {y.shape[0]} for a batch of 2")
    if y.shape[1] != config.num_classes:
        raise ModelImportError(
            f"the model has {y.shape[1]} output channels but {config.num_classes} class names were given "
            f"({', '.join(config.class_names)}): give one name per channel"
        )
    if tuple(y.shape[2:]) != (h, w):
        raise ModelImportError(
            f"the model's logits are {tuple(y.shape[2:])} for a {h}x{w} input: chanseg needs them at the input "
            "size (upsample inside the model, or choose an input size it keeps)"
        )
    if not y.dtype.is_floating_point:
        raise ModelImportError(f"the model returns {y.dtype}: chanseg needs float logits, not labels")


class _Converted(nn.Module):
    """A converted TorchScript graph as a module ``torch.export`` can export again with a
    dynamic batch. The graph is held outside the module tree: torch.export's unlifted
    modules refuse ``eval()``, and its weights are constants of the graph."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "graph", graph)

    def forward(self, x: Tensor) -> Tensor:
        return self.graph(x)


def exportable(module: torch.jit.ScriptModule, config: ModelConfig) -> nn.Module:
    """An imported model's TorchScript as an ``nn.Module`` that ``torch.export`` takes
    (torch's TorchScript converter), for ``python -m model compile``. fp32 only.

    Raises:
        ModelImportError: the converter cannot read the module (control flow from
            ``torch.jit.script`` usually: save a ``torch.jit.trace`` of it instead).
    """
    from torch._export.converter import TS2EPConverter

    h, w = config.input_size
    example = torch.randn(2, config.in_channels, h, w)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = TS2EPConverter(module, (example,)).convert()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelImportError(
            f"this TorchScript model cannot be converted for torch.export ({first}); a scripted model with "
            "loops or branches rarely can: import a torch.jit.trace of it to compile a package, "
            "or serve the TorchScript artifact as it is"
        ) from exc
    return _Converted(program.module())
