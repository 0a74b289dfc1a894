"""ModelConfig and ChannelAttentionUNet."""

from __future__ import annotations

import pytest
import torch

from model import ChannelAttentionUNet, ChannelBlock, ModelConfig


def test_config_json_round_trip():
    config = ModelConfig(widths=(8, 16, 32), num_classes=3, class_names=("a", "b", "c"), complementary=True)
    again = ModelConfig.from_json(config.to_json())
    assert again == config
    assert isinstance(again.widths, tuple) and again.widths == (8, 16, 32)


def test_default_config_is_the_documented_network():
    config = ModelConfig()
    assert config.widths == (16, 32, 64, 128, 256)
    assert (config.in_channels, config.num_classes, config.input_size) == (3, 4, (256, 256))
    assert config.class_names == ("background", "circle", "rectangle", "triangle")
    net = ChannelAttentionUNet(config)
    assert 3.6e6 < sum(p.numel() for p in net.parameters()) < 3.8e6
    assert sum(isinstance(m, ChannelBlock) for m in net.modules()) == 9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_names": ("a",)}, "class_names"),
        ({"widths": ()}, "widths"),
        ({"input_size": (100, 256)}, "multiples of 16"),
        ({"std": (1.0, 0.0, 1.0)}, "positive"),
        ({"mean": (0.5,)}, "mean and std"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"widths": [8], "depth": 3})


@pytest.mark.parametrize("widths", [(4,), (4, 8), (3, 5, 7, 9)])
def test_any_depth_and_width(widths):
    config = ModelConfig(widths=widths, num_classes=3, class_names=("x", "y", "z"), input_size=(32, 32))
    net = ChannelAttentionUNet(config).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 48)).shape == (2, 3, 32, 48)


def test_bad_input_size_says_what_would_work():
    net = ChannelAttentionUNet(ModelConfig(widths=(4, 8, 16)))
    with pytest.raises(ValueError, match=r"multiples of 4.*try 100x48"):
        net(torch.randn(1, 3, 101, 50))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net(torch.randn(1, 1, 64, 64))
