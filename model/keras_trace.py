"""A loaded Keras model as chanseg's logits module, traced to TorchScript.

Keras 3 on its torch backend runs a model's layers as torch modules, so a wrapper that
permutes chanseg's ``(N, 3, H, W)`` batch to Keras's channels-last and back is a torch
module too, and ``torch.jit.trace`` records it. Before that, :func:`head_of` decides what
the output is: a softmax or sigmoid the final layer says it has is removed (its
activation made the identity: the logits, exact); probabilities no layer names are taken
as they are, their log the logits; one channel ``x`` becomes two classes ``[0, x]``.
:func:`check_output` refuses outputs that are not ``(N, H, W, classes)`` at the input
size; :func:`trace` refuses Python decisions on tensor values in the model's own code
(a trace would fix them). The caller is :mod:`model.keras_import`.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Tuple

import torch
from torch import Tensor, nn

from .imported import ModelImportError
from .parity import first_line

__all__ = ["Head", "head_of", "remove_activation", "KerasLogits", "check_output", "trace"]


@dataclass(frozen=True)
class Head:
    """What the model's output is, and what the import does to make it logits."""

    code: str  # logits, softmax-removed, sigmoid-removed, log-softmax, probabilities-log, activation-kept
    detail: str
    binary: bool = False  # one channel x -> two classes [0, x]
    log: bool = False  # probabilities -> their log
    remove: Any = None  # the layer whose activation is removed
    threshold: float = 0.0  # one channel: Keras's own mask is output > threshold

    @property
    def unchanged(self) -> bool:
        """The artifact's logits are Keras's outputs as they are."""
        return self.remove is None and not self.binary and not self.log

    @property
    def was_probabilities(self) -> bool:
        return self.code in ("softmax-removed", "sigmoid-removed", "probabilities-log")

    def probabilities(self, logits: Tensor) -> Tensor:
        """What Keras's own output was, from the artifact's logits ``(N, C, H, W)``."""
        if self.code == "sigmoid-removed":
            return torch.softmax(logits, 1)[:, 1:] if self.binary else torch.sigmoid(logits)
        return torch.softmax(logits, 1)


def final_layer(keras: Any, model: Any) -> Any:
    """The layer that computes the model's output (inside nested models), or None."""
    op = model
    while isinstance(op, keras.Model):
        outputs = getattr(op, "outputs", None)
        if not outputs or len(outputs) != 1 or not hasattr(outputs[0], "_keras_history"):
            return None
        op = outputs[0]._keras_history.operation
    return op


def remove_activation(keras: Any, layer: Any) -> None:
    """The final layer's activation made the identity: the model then returns its logits."""
    if isinstance(layer, keras.layers.Softmax):
        layer.call = lambda inputs, mask=None: inputs
    else:
        layer.activation = keras.activations.linear


def head_of(keras: Any, model: Any, channels: int, probabilities: bool) -> Head:
    """What the output is, and which activation to remove (see the module docstring).

    ``probabilities``: the outputs of the shape check are in [0, 1] and sum to 1 over
    the channels (what is done when no layer says so)."""
    layer = final_layer(keras, model)
    where = f"the final {type(layer).__name__} {layer.name!r}" if layer is not None else "the output"
    activation = None
    if layer is not None and isinstance(layer, keras.layers.Softmax):
        axis = layer.axis if isinstance(layer.axis, int) else tuple(layer.axis)
        if axis not in (-1, 3, (-1,), (3,)):
            raise ModelImportError(
                f"{where} takes its softmax over axis {axis}: chanseg needs it over the classes"
            )
        activation = "softmax"
    elif layer is not None and callable(getattr(layer, "activation", None)):
        activation = getattr(layer.activation, "__name__", None)
    binary = channels == 1
    if activation == "softmax":
        if binary:
            raise ModelImportError(f"{where} takes a softmax over one channel: its output is always 1")
        detail = f"softmax removed: the logits are {where}'s outputs before its softmax"
        return Head("softmax-removed", detail, remove=layer)
    if activation == "sigmoid":
        if binary:
            detail = (
                f"sigmoid removed: {where}'s logit x before its sigmoid, as two classes [0, x] "
                "(class 1 where sigmoid(x) > 0.5)"
            )
            return Head("sigmoid-removed", detail, binary=True, remove=layer, threshold=0.5)
        detail = (
            f"sigmoid removed: {where}'s logits before its sigmoid, one per class (the mask is their argmax, "
            "as of the probabilities)"
        )
        return Head("sigmoid-removed", detail, remove=layer)
    if activation == "log_softmax":
        return Head("log-softmax", f"{where}'s log_softmax kept: log-probabilities are logits")
    if binary:
        return Head(
            "logits", f"one channel: {where}'s logit x as two classes [0, x] (class 1 where x > 0)", True
        )
    if activation not in (None, "linear"):
        return Head("activation-kept", f"{where}'s activation {activation} kept: its outputs are the logits")
    if probabilities:
        return Head(
            "probabilities-log",
            f"probabilities ({where} sums to 1 over the classes, and no softmax layer says so): their log is "
            "taken as the logits (the argmax is unchanged)",
            log=True,
        )
    return Head("logits", f"logits: {where} has no activation")


class KerasLogits(nn.Module):
    """A Keras model on the torch backend as chanseg's ``(N, 3, H, W)`` -> ``(N, C, H, W)`` logits."""

    def __init__(self, keras_model: Any, head: Head) -> None:
        super().__init__()
        self.keras_model = keras_model  # a torch module on the torch backend: its variables are parameters
        self.binary = head.binary
        self.log = head.log

    def forward(self, x: Tensor) -> Tensor:
        y = self.keras_model(x.permute(0, 2, 3, 1), training=False).permute(0, 3, 1, 2)
        if self.log:
            y = torch.log(y.clamp_min(torch.finfo(y.dtype).tiny))
        if self.binary:
            y = torch.cat([torch.zeros_like(y), y], dim=1)
        return y


def check_output(y: Any, size: Tuple[int, int], classes: int) -> int:
    """The Keras model's output for a batch of two at ``size``: its channel count, or a refusal."""
    h, w = size
    if isinstance(y, (list, tuple, dict)):
        raise ModelImportError(
            f"the Keras model has {len(y)} outputs: chanseg serves one (N, H, W, classes) output; make a "
            "keras.Model(inputs, segmentation_output) of it"
        )
    shape = tuple(y.shape)
    if len(shape) == 2:
        raise ModelImportError(
            f"the Keras model returns {shape} for a (2, {h}, {w}, 3) batch: a classifier's (N, classes) is not "
            "a segmentation model; chanseg needs (N, H, W, classes)"
        )
    if len(shape) != 4 or shape[0] != 2:
        raise ModelImportError(
            f"the Keras model returns {shape} for a (2, {h}, {w}, 3) batch: chanseg needs (N, H, W, classes)"
        )
    if shape[1:3] != (h, w):
        raise ModelImportError(
            f"the Keras model's output is {shape[1]}x{shape[2]} for a {h}x{w} input: chanseg needs it at the "
            "input size (upsample inside the model, or choose an input size it keeps)"
        )
    if not y.dtype.is_floating_point or y.dtype != torch.float32:
        raise ModelImportError(
            f"the Keras model returns {y.dtype}: chanseg imports float32 models (a mixed-precision policy: "
            "keras.config.set_dtype_policy('float32') before building it, then save it again)"
        )
    channels = shape[3]
    wanted = 2 if channels == 1 else channels
    if classes != wanted:
        per = " (a one-channel output is two classes: background, then yours)" if channels == 1 else ""
        raise ModelImportError(
            f"the Keras model has {channels} output channels but {classes} class names were given{per}: give "
            f"{wanted} names"
        )
    return channels


def trace(wrapper: nn.Module, example: Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace``; Python decisions on tensor values in the model's own code are refused."""
    own = tuple(str(Path(m.__file__).parent) for m in (torch, sys.modules["keras"])) + (__file__,)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(wrapper, example, check_trace=False)
        except Exception as exc:
            raise ModelImportError(
                f"the Keras model cannot be traced on the torch backend ({first_line(exc)}): a layer does "
                "something TorchScript cannot record; write it with keras.ops"
            ) from exc
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning) and not str(w.filename).startswith(own):
            raise ModelImportError(
                f"the model's own code decides on a tensor's value in Python at {w.filename}:{w.lineno} "
                f"({first_line(w.message)}): a trace fixes that decision for every image, so this model "
                "cannot be converted; write the branch with tensor operations (keras.ops.where)"
            )
    return traced
