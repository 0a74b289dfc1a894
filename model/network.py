"""``ModelConfig`` and ``ChannelAttentionUNet``: a U-Net built from channel-attention blocks.

U-Net: Ronneberger et al., 2015, https://arxiv.org/abs/1505.04597. Every stage,
encoder and decoder, is a :class:`~model.blocks.ChannelBlock`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, List, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .blocks import ChannelBlock

__all__ = ["ModelConfig", "ChannelAttentionUNet", "check_identifier"]


NETWORKS = ("channel-attention-unet", "imported")
# A model's name and version go into URLs, HTTP headers, gRPC metadata, metric labels and logs.
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def check_identifier(what: str, value: Any) -> str:
    """``value`` if it can be a model's name or version: a letter or digit, then letters,
    digits, ``.``, ``_``, ``-`` or ``+``, 64 characters at most; else ``ValueError``."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ValueError(
            f"model {what} {shown}: use letters, digits, '.', '_', '-' and '+' (beginning with a letter or "
            "digit, at most 64 characters); it goes into URLs, HTTP headers and gRPC metadata"
        )
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network and how images are fed to it.

    Args:
        in_channels: image channels (3 for RGB).
        num_classes: output classes, background included.
        class_names: one name per class.
        widths: channels of each encoder stage; its length is the depth.
        input_size: ``(height, width)`` images are resized to; each must be
            divisible by ``2 ** (len(widths) - 1)``.
        mean, std: per-channel normalisation of pixel values scaled to [0, 1].
        negative_slope: LeakyReLU slope.
        complementary: branch mix of the blocks (see ``ChannelBlock``).
        name: the model's name, used by servers and in artifact metadata.
        network: ``channel-attention-unet`` (this module's network, built from
            ``widths``, ``negative_slope`` and ``complementary``), or ``imported``:
            a TorchScript model of someone else's that ``python -m model import``
            wrapped (those three fields then mean nothing; any input size).
    """

    in_channels: int = 3
    num_classes: int = 4
    class_names: Tuple[str, ...] = ("background", "circle", "rectangle", "triangle")
    widths: Tuple[int, ...] = (16, 32, 64, 128, 256)
    input_size: Tuple[int, int] = (256, 256)
    mean: Tuple[float, ...] = (0.5, 0.5, 0.5)
    std: Tuple[float, ...] = (0.25, 0.25, 0.25)
    negative_slope: float = 0.01
    complementary: bool = False
    name: str = "chanseg"
    network: str = "channel-attention-unet"

    def __post_init__(self) -> None:
        for name in ("class_names", "widths", "input_size", "mean", "std"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        check_identifier("name", self.name)
        if self.in_channels < 1 or self.num_classes < 2:
            raise ValueError("in_channels must be >= 1 and num_classes >= 2")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {self.num_classes} classes")
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive, got {self.widths}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one value per input channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if len(self.input_size) != 2:
            raise ValueError("input_size is (height, width)")
        div = self.size_divisor
        if any(s < div or s % div for s in self.input_size):
            raise ValueError(f"input_size {self.input_size} must be multiples of {div}")

    @property
    def size_divisor(self) -> int:
        """Image sides the network accepts are multiples of this (1: an imported model's own business)."""
        return 2 ** (len(self.widths) - 1) if self.network == NETWORKS[0] else 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


class _DecoderStage(nn.Module):
    """Upsample by 2, concatenate the skip, apply a ChannelBlock."""

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float, complementary: bool):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.block = ChannelBlock(2 * out_channels, out_channels, negative_slope, complementary)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class ChannelAttentionUNet(nn.Module):
    """A U-Net whose every stage is a channel-attention block.

    Encoder: ``ChannelBlock`` per width, 2x2 max pooling between stages.
    Decoder: per skip, a 2x2 stride-2 transposed convolution, concatenation
    with the skip, and a ``ChannelBlock``. A 1x1 convolution gives the logits.

    Args:
        config: a :class:`ModelConfig`; ``ModelConfig()`` is the default network
            (widths 16-32-64-128-256, 3.7 M parameters, 4 classes).

    Shape: input ``(N, in_channels, H, W)`` with H and W multiples of
    ``config.size_divisor``; output logits ``(N, num_classes, H, W)``.

    Example:
        >>> net = ChannelAttentionUNet(ModelConfig(widths=(8, 16))).eval()
        >>> net(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 4, 64, 64])
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = config or ModelConfig()
        self.config = config
        self.size_divisor = config.size_divisor
        slope, comp = config.negative_slope, config.complementary
        widths = list(config.widths)
        in_widths = [config.in_channels] + widths[:-1]
        self.encoder = nn.ModuleList([ChannelBlock(i, o, slope, comp) for i, o in zip(in_widths, widths)])
        self.decoder = nn.ModuleList(
            [_DecoderStage(widths[i + 1], widths[i], slope, comp) for i in reversed(range(len(widths) - 1))]
        )
        self.classifier = nn.Conv2d(widths[0], config.num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        skips: List[Tensor] = []
        for i, stage in enumerate(self.encoder):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = stage(x)
            skips.append(x)
        for j, stage in enumerate(self.decoder):
            x = stage(x, skips[len(skips) - 2 - j])
        return self.classifier(x)

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        d = self.size_divisor
        h, w = x.shape[-2:]
        if h % d or w % d:
            fit = (max(d, round(h / d) * d), max(d, round(w / d) * d))
            raise ValueError(f"height and width must be multiples of {d}; got {h}x{w}, try {fit[0]}x{fit[1]}")
