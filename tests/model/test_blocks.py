"""ChannelBlock against a functional reference written straight from the Keras code (docs/design.md)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from model import ChannelBlock
from tests.conftest import _randomize_batchnorm


def _bn(x, bn):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + 1e-3) * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


def seed_reference(block: ChannelBlock, data: torch.Tensor, slope: float, complementary: bool):
    """The Keras Channelblock, line by line, with torch's own leaky_relu as `act`."""
    conv1, bn1 = block.branch3[0], block.branch3[1]
    conv2, bn2 = block.branch5[0], block.branch5[1]
    att, conv3, bn3 = block.attention, block.fuse[0], block.fuse[1]

    def act(t):
        return F.leaky_relu(t, slope)

    leaky1 = act(_bn(F.conv2d(data, conv1.weight, conv1.bias, padding="same", dilation=3), bn1))
    leaky2 = act(_bn(F.conv2d(data, conv2.weight, conv2.bias, padding="same"), bn2))
    data3 = torch.cat([leaky1, leaky2], dim=1)
    data3 = data3.mean(dim=(2, 3))  # GlobalAveragePooling2D
    data3 = act(_bn(F.linear(data3, att.fc1.weight, att.fc1.bias), att.bn))
    data3 = torch.sigmoid(F.linear(data3, att.fc2.weight, att.fc2.bias))
    a = data3.reshape(data3.shape[0], -1, 1, 1)
    a1 = 1 - a if complementary else a
    y = torch.cat([leaky1 * a, leaky2 * a1], dim=1)
    return act(_bn(F.conv2d(y, conv3.weight, conv3.bias), bn3)), a


@pytest.mark.parametrize("complementary", [False, True])
@pytest.mark.parametrize("slope", [0.01, 0.2])
def test_block_matches_seed_reference(complementary, slope):
    torch.manual_seed(0)
    block = ChannelBlock(5, 12, negative_slope=slope, complementary=complementary)
    _randomize_batchnorm(block, seed=1)
    block.eval()
    x = torch.randn(3, 5, 23, 17)
    with torch.no_grad():
        expected, a_ref = seed_reference(block, x, slope, complementary)
        out = block(x)
        a = block.attention(block.branch3(x), block.branch5(x))
    assert out.shape == (3, 12, 23, 17)
    assert a.shape == (3, 12, 1, 1)
    assert (out - expected).abs().max() <= 1e-5
    assert (a - a_ref).abs().max() <= 1e-6


def test_complementary_changes_output():
    torch.manual_seed(0)
    plain = ChannelBlock(3, 8).eval()
    comp = ChannelBlock(3, 8, complementary=True).eval()
    comp.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (plain(x) - comp(x)).abs().max() > 1e-3


def test_keras_defaults():
    block = ChannelBlock(3, 8)
    bns = [m for m in block.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    assert len(bns) == 4 and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    convs = [m for m in block.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(m.bias is not None for m in convs)
    assert block.branch3[0].dilation == (3, 3) and block.branch3[0].kernel_size == (3, 3)
    assert block.branch5[0].kernel_size == (5, 5) and block.fuse[0].kernel_size == (1, 1)


def test_block_scripts_and_matches_eager():
    block = ChannelBlock(3, 8, complementary=True).eval()
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(block)(x), block(x))
