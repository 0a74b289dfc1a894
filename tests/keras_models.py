"""Real Keras models for the import tests: Keras 3 on its torch backend, random weights,
nothing downloaded. Keras is in the ``keras`` extra (and ``dev``): without it the tests
skip here and fail under CI (``tests/real_parts.py``).

The seed's ``Channelblock`` is written out as its Keras code has it (``docs/design.md``;
auto-named layers, ``Activation('relu')``), apart from ``model.keras_unet``'s twin, so
that importing weights saved from it checks the twin against the seed's code itself.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from tests.real_parts import missing

os.environ["KERAS_BACKEND"] = "torch"  # before Keras is imported anywhere in this process

__all__ = [
    "need_keras",
    "channelblock",
    "seed_unet",
    "encoder_decoder",
    "softmax_head",
    "randomize",
    "keras_mask",
]


def need_keras() -> Any:
    """Keras 3 on the torch backend, or skip (locally) / fail (under CI)."""
    try:
        import keras
    except ImportError:
        missing("keras", "pip install -e '.[keras]' (Keras 3; its torch backend, no TensorFlow)")
    assert keras.backend.backend() == "torch", keras.backend.backend()
    return keras


def channelblock(data: Any, filte: int, act: str = "relu") -> Any:
    """The seed's ``Channelblock(data, filte)``, as its Keras code reads (``act``: ``relu``
    as there, or ``leaky`` for a LeakyReLU of slope 0.01)."""
    from keras.layers import (
        Activation,
        BatchNormalization,
        Conv2D,
        Dense,
        GlobalAveragePooling2D,
        LeakyReLU,
        Reshape,
        concatenate,
        multiply,
    )

    def relu(x: Any) -> Any:
        return Activation("relu")(x) if act == "relu" else LeakyReLU(negative_slope=0.01)(x)

    conv1 = Conv2D(filte, (3, 3), padding="same", dilation_rate=(3, 3))(data)
    batch1 = BatchNormalization()(conv1)
    LeakyReLU1 = relu(batch1)
    conv2 = Conv2D(filte, (5, 5), padding="same")(data)
    batch2 = BatchNormalization()(conv2)
    LeakyReLU2 = relu(batch2)
    data3 = concatenate([LeakyReLU1, LeakyReLU2])
    data3 = GlobalAveragePooling2D()(data3)
    data3 = Dense(units=filte)(data3)
    data3 = BatchNormalization()(data3)
    data3 = relu(data3)
    data3 = Dense(units=filte)(data3)
    data3 = Activation("sigmoid")(data3)
    a = Reshape((1, 1, filte))(data3)
    a1 = data3
    a1 = Reshape((1, 1, filte))(a1)
    y = multiply([LeakyReLU1, a])
    y1 = multiply([LeakyReLU2, a1])
    data_a_a1 = concatenate([y, y1])
    conv3 = Conv2D(filte, (1, 1), padding="same")(data_a_a1)
    batch3 = BatchNormalization()(conv3)
    LeakyReLU3 = relu(batch3)
    return LeakyReLU3


def seed_unet(widths: Sequence[int] = (8, 16), classes: int = 3, act: str = "relu", seed: int = 0) -> Any:
    """A U-Net of the seed's blocks, assembled as chanseg's network is (2x2 max pooling;
    ``Conv2DTranspose`` 2x2 stride 2, ``concatenate([up, skip])``, a block; a 1x1 classifier)."""
    keras = need_keras()
    from keras import layers

    inputs = keras.Input((None, None, 3))
    x, skips = inputs, []
    for i, width in enumerate(widths):
        if i > 0:
            x = layers.MaxPooling2D(2)(x)
        x = channelblock(x, width, act)
        skips.append(x)
    for i in reversed(range(len(widths) - 1)):
        up = layers.Conv2DTranspose(widths[i], 2, strides=2, padding="same")(x)
        x = channelblock(layers.concatenate([up, skips[i]]), widths[i], act)
    return randomize(keras.Model(inputs, layers.Conv2D(classes, 1)(x)), seed)


def encoder_decoder(classes: int = 3, seed: int = 1) -> Any:
    """A plain Keras encoder-decoder: convolutions, batch norm, pooling, bilinear upsampling, a skip."""
    keras = need_keras()
    from keras import layers

    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(8, 3, padding="same")(inputs)
    skip = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.MaxPooling2D(2)(skip)
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = layers.UpSampling2D(4, interpolation="bilinear")(x)
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(layers.concatenate([x, skip]))
    return randomize(keras.Model(inputs, layers.Conv2D(classes, 1)(x)), seed)


def softmax_head(classes: int = 3, seed: int = 2) -> Any:
    """A Sequential encoder-decoder whose last layer is a softmax over the classes."""
    keras = need_keras()
    from keras import layers

    model = keras.Sequential(
        [
            keras.Input((None, None, 3)),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.BatchNormalization(),
            layers.MaxPooling2D(2),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.Conv2DTranspose(8, 2, strides=2, padding="same", activation="relu"),
            layers.Conv2D(classes, 1),
            layers.Activation("softmax"),
        ]
    )
    return randomize(model, seed)


def randomize(model: Any, seed: int) -> Any:
    """Random biases and batch-norm parameters and statistics too (Keras starts them at 0
    and 1, which would let a mapping that drops them pass)."""
    keras = need_keras()
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.weights
            gamma.assign(rng.uniform(0.5, 1.5, gamma.shape).astype("float32"))
            beta.assign(rng.normal(0, 0.2, beta.shape).astype("float32"))
            mean.assign(rng.normal(0, 0.5, mean.shape).astype("float32"))
            variance.assign(rng.uniform(0.5, 2.0, variance.shape).astype("float32"))
        elif len(layer.weights) == 2:  # kernel, bias
            bias = layer.weights[1]
            bias.assign(rng.normal(0, 0.1, bias.shape).astype("float32"))
    return model


def keras_mask(
    kmodel: Any,
    image: np.ndarray,
    size: Sequence[int] = (64, 64),
    threshold: Optional[float] = None,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """What a Keras user computes for ``image``: resized (PIL bilinear, as chanseg does),
    scaled to [0, 1] and normalised, Keras's own output, its argmax (or for one channel,
    output > ``threshold``), upsampled (nearest) to the image's size."""
    from model.preprocess import prepare_image

    x = torch.from_numpy(np.array(prepare_image(image, size)))[None].float() / 255
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    with torch.no_grad():
        y = kmodel(x, training=False)
    labels = (y[..., 0] > threshold) if threshold is not None else y.argmax(-1)
    labels = labels.to(torch.uint8)[:, None]
    return F.interpolate(labels, size=image.shape[:2], mode="nearest-exact")[0, 0].numpy()
