"""The channel-attention block, ported from Keras to PyTorch (docs/design.md has the Keras code).

The Keras ``Channelblock`` (an AAU-Net-style block, Chen et al., 2022,
"AAU-net: An Adaptive Attention U-net for Breast Lesions Segmentation in
Ultrasound Images", https://arxiv.org/abs/2204.12077) runs two convolution
branches (3x3 dilated by 3, and 5x5), squeezes both by global average pooling,
learns per-channel weights with Dense-BN-act-Dense-sigmoid, reweights the
branches, concatenates them and fuses with a 1x1 convolution. Every ReLU of the
Keras code is a hand-written LeakyReLU here. Keras defaults carry over (biases on,
BatchNorm eps 1e-3, momentum 0.99 in Keras = 0.01 in PyTorch) so that weights
trained in Keras port exactly (NHWC there, NCHW here).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import LeakyReLU

__all__ = ["ChannelAttention", "ChannelBlock", "KERAS_BN_EPS", "KERAS_BN_MOMENTUM"]

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01  # Keras momentum 0.99 is PyTorch momentum 0.01


def _conv_bn_act(
    in_channels: int, out_channels: int, kernel_size: int, dilation: int, negative_slope: float
) -> nn.Sequential:
    # Keras "same" padding for an odd kernel is dilation * (k - 1) / 2 on each side.
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation),
        nn.BatchNorm2d(out_channels, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM),
        LeakyReLU(negative_slope),
    )


class ChannelAttention(nn.Module):
    """Per-channel weights from the two branches (the ``s`` and ``a`` lines of the Keras code).

    ``a = sigmoid(Dense(act(BN(Dense(GAP(concat[b1, b2]))))))``

    Args:
        channels: channels of each branch (the Keras code's ``filte``).
        negative_slope: LeakyReLU slope.

    Shape: ``b1``, ``b2``: ``(N, F, H, W)``; returns ``a``: ``(N, F, 1, 1)``.
    """

    def __init__(self, channels: int, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * channels, channels)
        self.bn = nn.BatchNorm1d(channels, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)
        self.act = LeakyReLU(negative_slope)
        self.fc2 = nn.Linear(channels, channels)

    def forward(self, b1: Tensor, b2: Tensor) -> Tensor:
        # GAP(concat([b1, b2])) == concat([GAP(b1), GAP(b2)]); the concatenated
        # feature map itself is never needed.
        s = torch.cat([b1.mean(dim=(2, 3)), b2.mean(dim=(2, 3))], dim=1)
        s = self.act(self.bn(self.fc1(s)))
        a = torch.sigmoid(self.fc2(s))
        return a.unsqueeze(-1).unsqueeze(-1)


class ChannelBlock(nn.Module):
    """The Keras ``Channelblock(data, filte)`` with LeakyReLU activations.

    ::

        b1 = act(BN(Conv3x3, dilation 3 (x)))     b2 = act(BN(Conv5x5(x)))
        a  = ChannelAttention(b1, b2)             a1 = a  (or 1 - a)
        y  = act(BN(Conv1x1(concat[b1 * a, b2 * a1])))

    Args:
        in_channels: channels of the input.
        out_channels: channels of each branch and of the output (``filte``).
        negative_slope: LeakyReLU slope for every activation.
        complementary: ``False`` (the Keras code) weights both branches by ``a``;
            ``True`` (AAU-Net) weights the 5x5 branch by ``1 - a``, a soft
            selection between the branches.

    Shape: input ``(N, in_channels, H, W)``, output ``(N, out_channels, H, W)``.

    Example:
        >>> block = ChannelBlock(3, 16).eval()
        >>> block(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 16, 32, 32])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        negative_slope: float = 0.01,
        complementary: bool = False,
    ) -> None:
        super().__init__()
        self.complementary = complementary
        self.branch3 = _conv_bn_act(in_channels, out_channels, 3, 3, negative_slope)
        self.branch5 = _conv_bn_act(in_channels, out_channels, 5, 1, negative_slope)
        self.attention = ChannelAttention(out_channels, negative_slope)
        self.fuse = _conv_bn_act(2 * out_channels, out_channels, 1, 1, negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch3(x)
        b2 = self.branch5(x)
        a = self.attention(b1, b2)
        a1 = 1.0 - a if self.complementary else a
        return self.fuse(torch.cat([b1 * a, b2 * a1], dim=1))
