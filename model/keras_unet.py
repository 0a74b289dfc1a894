"""chanseg's network in Keras, and its weights in PyTorch.

:func:`keras_channel_attention_unet` builds :class:`~model.network.ChannelAttentionUNet`
in Keras 3, stage for stage: every block is the seed's ``Channelblock`` as its Keras
code writes it (``docs/design.md``), with ``Activation('relu')`` as there or a
``LeakyReLU``; 2x2 max pooling between encoder stages; per decoder stage a 2x2
stride-2 ``Conv2DTranspose``, ``concatenate([up, skip])`` and a block; a 1x1
``Conv2D`` classifier without an activation. Train it in Keras, ``save_weights``,
and ``python -m model import net.weights.h5`` makes a chanseg artifact of the weights.

:func:`torch_state_dict` reads the Keras model's weights into the PyTorch network's
state dict. Each Keras layer is named after the PyTorch module it becomes
(``encoder.0.branch3.0``), so the mapping is by name, and each kind of layer has one
rule: ``Conv2D`` kernels HWIO -> OIHW, ``Conv2DTranspose`` kernels (H, W, out, in) ->
(in, out, H, W), ``Dense`` kernels (in, out) -> (out, in), ``BatchNormalization``'s
gamma, beta, moving mean and variance -> weight, bias, running mean and variance (its
epsilon is Keras's default, 1e-3, which the PyTorch blocks use too).

Keras is imported inside the functions: ``import model`` never needs it.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import Tensor

from .blocks import KERAS_BN_EPS
from .export import export_torchscript
from .imported import ModelImportError
from .network import ChannelAttentionUNet, ModelConfig
from .parity import Batch, Proof, first_line, synthetic_inputs, write_proven

__all__ = ["keras_channel_attention_unet", "torch_state_dict", "import_weights"]


def keras_name(torch_name: str) -> str:
    """A Keras layer's name for the PyTorch module ``torch_name`` (Keras on torch keeps
    its variables in a ``ParameterDict``, whose keys cannot hold dots)."""
    return torch_name.replace(".", "-")


def _activation(layers: Any, negative_slope: float, name: str) -> Any:
    if negative_slope == 0:
        return layers.Activation("relu", name=name)
    return layers.LeakyReLU(negative_slope=negative_slope, name=name)


def _channel_block(layers: Any, data: Any, filte: int, config: ModelConfig, prefix: str) -> Any:
    """The seed's ``Channelblock(data, filte)``, line for line (docs/design.md), its layers
    named after the PyTorch modules of :class:`~model.blocks.ChannelBlock` under ``prefix``."""

    def named(where: str) -> str:
        return keras_name(f"{prefix}.{where}")

    def act(x: Any, where: str) -> Any:
        return _activation(layers, config.negative_slope, named(f"{where}.act"))(x)

    def bn(x: Any, where: str) -> Any:
        return layers.BatchNormalization(epsilon=KERAS_BN_EPS, name=named(where))(x)

    conv1 = layers.Conv2D(filte, (3, 3), padding="same", dilation_rate=(3, 3), name=named("branch3.0"))(data)
    relu1 = act(bn(conv1, "branch3.1"), "branch3")
    conv2 = layers.Conv2D(filte, (5, 5), padding="same", name=named("branch5.0"))(data)
    relu2 = act(bn(conv2, "branch5.1"), "branch5")
    data3 = layers.concatenate([relu1, relu2], name=named("concat"))
    data3 = layers.GlobalAveragePooling2D(name=named("attention.gap"))(data3)
    data3 = layers.Dense(units=filte, name=named("attention.fc1"))(data3)
    data3 = act(bn(data3, "attention.bn"), "attention")
    data3 = layers.Dense(units=filte, name=named("attention.fc2"))(data3)
    data3 = layers.Activation("sigmoid", name=named("attention.sigmoid"))(data3)
    a = layers.Reshape((1, 1, filte), name=named("attention.a"))(data3)
    if config.complementary:  # AAU-Net's a1 = 1 - a; the seed's a1 = a
        a1 = layers.Rescaling(-1.0, offset=1.0, name=named("attention.one_minus"))(data3)
    else:
        a1 = data3
    a1 = layers.Reshape((1, 1, filte), name=named("attention.a1"))(a1)
    y = layers.multiply([relu1, a], name=named("weigh3"))
    y1 = layers.multiply([relu2, a1], name=named("weigh5"))
    data_a_a1 = layers.concatenate([y, y1], name=named("mix"))
    conv3 = layers.Conv2D(filte, (1, 1), padding="same", name=named("fuse.0"))(data_a_a1)
    return act(bn(conv3, "fuse.1"), "fuse")


def keras_channel_attention_unet(config: ModelConfig) -> Any:
    """:class:`~model.network.ChannelAttentionUNet` as a Keras 3 functional model.

    Args:
        config: the network's :class:`ModelConfig` (``widths``, ``num_classes``,
            ``in_channels``, ``complementary``); ``negative_slope`` 0 gives the seed's
            ``Activation('relu')``, any other value a ``LeakyReLU`` of that slope.

    Returns:
        A ``keras.Model`` taking ``(N, H, W, in_channels)`` (any H and W that are
        multiples of ``config.size_divisor``) and returning logits ``(N, H, W, classes)``.

    Example (Keras 3 with ``KERAS_BACKEND=torch``)::

        net = keras_channel_attention_unet(ModelConfig(widths=(8, 16), num_classes=2,
                                                       class_names=("bg", "fg"), negative_slope=0.0))
        net.compile(...); net.fit(...); net.save_weights("unet.weights.h5")
    """
    import keras
    from keras import layers

    if config.network != "channel-attention-unet":
        raise ValueError(f"a {config.network!r} config has no Keras twin")
    inputs = keras.Input((None, None, config.in_channels), name="image")
    x, skips = inputs, []
    for i, width in enumerate(config.widths):
        if i > 0:
            x = layers.MaxPooling2D(2, name=keras_name(f"encoder.{i}.pool"))(x)
        x = _channel_block(layers, x, width, config, f"encoder.{i}")
        skips.append(x)
    widths = list(config.widths)
    for j, i in enumerate(reversed(range(len(widths) - 1))):
        up = layers.Conv2DTranspose(
            widths[i], 2, strides=2, padding="same", name=keras_name(f"decoder.{j}.up")
        )(x)
        x = layers.concatenate([up, skips[i]], name=keras_name(f"decoder.{j}.concat"))
        x = _channel_block(layers, x, widths[i], config, f"decoder.{j}.block")
    logits = layers.Conv2D(config.num_classes, 1, name="classifier")(x)
    return keras.Model(inputs, logits, name=config.name)


def _tensor(variable: Any) -> Tensor:
    return torch.as_tensor(variable.numpy(), dtype=torch.float32)


def torch_state_dict(keras_model: Any) -> Dict[str, Tensor]:
    """The PyTorch state dict of the Keras twin's weights (see the module docstring).

    Args:
        keras_model: a model built by :func:`keras_channel_attention_unet`.

    Returns:
        ``{name: tensor}`` for every parameter and running statistic of the matching
        :class:`~model.network.ChannelAttentionUNet` (``num_batches_tracked`` aside).
    """
    from keras import layers

    state: Dict[str, Tensor] = {}
    for layer in keras_model.layers:
        weights: List[Tensor] = [_tensor(v) for v in layer.weights]
        if not weights:
            continue
        name = layer.name.replace("-", ".")
        if isinstance(layer, (layers.Conv2D, layers.Conv2DTranspose)):
            # Conv2D: (H, W, in, out) -> (out, in, H, W); Conv2DTranspose: (H, W, out, in) -> (in, out, H, W)
            kernel, bias = weights
            state[f"{name}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()
            state[f"{name}.bias"] = bias
        elif isinstance(layer, layers.Dense):
            kernel, bias = weights
            state[f"{name}.weight"] = kernel.t().contiguous()
            state[f"{name}.bias"] = bias
        elif isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, variance = weights
            state.update(
                {
                    f"{name}.weight": gamma,
                    f"{name}.bias": beta,
                    f"{name}.running_mean": mean,
                    f"{name}.running_var": variance,
                }
            )
        else:
            raise ValueError(f"layer {name} ({type(layer).__name__}) has weights chanseg does not map")
    return state


def _count_arrays(source: Path) -> int:
    import h5py

    count = 0

    def visit(_: str, obj: Any) -> None:
        nonlocal count
        count += isinstance(obj, h5py.Dataset)

    with h5py.File(source, "r") as f:
        f.visititems(visit)
    return count


def _misfit(exc: BaseException) -> str:
    """Which layer Keras could not fill, and the shapes, from its (long) message."""
    text = str(exc)
    layer = re.search(r"object <(\w+) name=([^,>]+)", text)
    shapes = re.search(
        r"variable\.shape=(\([^)]*\)), Received: value\.shape=torch\.Size\(\[([^\]]*)\]\)", text
    )
    if not (layer and shapes):
        return first_line(exc)
    name = layer.group(2).replace("-", ".")
    return f"Keras: the {layer.group(1)} {name!r} expects {shapes.group(1)}, the file has ({shapes.group(2)})"


def import_weights(
    source: str | os.PathLike, out: str | os.PathLike, config: ModelConfig, version: str = "1",
    started: float | None = None,
) -> Path:  # fmt: skip
    """Keras weights of chanseg's network (``.weights.h5``, or a legacy ``.h5`` of weights)
    into a chanseg artifact of :class:`ChannelAttentionUNet`, its parity with the Keras
    twin proven (:func:`model.parity.write_proven`). ``python -m model import`` calls it
    through :func:`model.keras_import.import_keras`, with Keras 3 on its torch backend.

    Keras loads the file into :func:`keras_channel_attention_unet` (by layer order and
    kind, as Keras matches weights), so the layers' names in the file do not matter.

    Raises:
        ModelImportError: the file's weights do not fit the network ``config`` describes.
    """
    import keras

    started = time.perf_counter() if started is None else started
    source = Path(source)
    kmodel = keras_channel_attention_unet(config)
    described = f"chanseg's channel-attention U-Net with widths {list(config.widths)} and {config.num_classes} classes"
    arrays, expected = _count_arrays(source), len(kmodel.weights)
    if arrays != expected:
        raise ModelImportError(
            f"{source} holds {arrays} weight arrays; {described} has {expected}: give the --widths and "
            "--classes it was trained with (weights of another network cannot be imported without it: "
            "save the whole model, model.save('x.keras'))"
        )
    try:
        kmodel.load_weights(source)
    except Exception as exc:
        raise ModelImportError(
            f"the weights in {source} do not fit {described} ({_misfit(exc)}): give the --widths and "
            "--classes it was trained with"
        ) from exc
    net = ChannelAttentionUNet(config).eval()
    missing, unexpected = net.load_state_dict(torch_state_dict(kmodel), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:  # the twin and the network disagree: a bug here, not in the file
        raise ModelImportError(
            f"the Keras twin does not map onto the network: missing {missing}, unexpected {unexpected}"
        )

    batches = []
    with torch.no_grad():
        for at, x in synthetic_inputs(config):
            logits = kmodel(x.permute(0, 2, 3, 1), training=False).permute(0, 3, 1, 2)
            batches.append(Batch(at, x, logits, logits.argmax(1)))
    activation = (
        "ReLU (the seed's)" if config.negative_slope == 0 else f"LeakyReLU({config.negative_slope:g})"
    )
    proof = Proof(
        f"keras {keras.__version__}, torch backend (model.keras_unet's twin of the network)", batches
    )
    about = {
        "head": "logits",
        "head_detail": f"logits: chanseg's 1x1 classifier has no activation; activations {activation}",
    }

    def write(path: Path, parity: Dict[str, Any]) -> Path:
        meta = {"imported_from": source.name, "keras_version": keras.__version__, "parity": parity}
        return export_torchscript(net, path, config, version=version, extra_meta=meta)

    return write_proven(write, out, proof, "the PyTorch network", about, started)
