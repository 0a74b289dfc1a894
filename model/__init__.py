"""chanseg's model package: a channel-attention U-Net for image segmentation.

Importable on its own (``import model``): it needs torch, numpy, pillow and
safetensors, never a web framework.

Example:
    >>> import model
    >>> seg = model.load()                      # the bundled default, cpu or cuda
    >>> mask = seg.predict(image)               # (H, W) uint8 class ids
"""

__version__ = "0.1.0"

from .blocks import ChannelAttention, ChannelBlock  # noqa: E402
from .export import Artifact, ModelLoadError, export_torchscript, read_artifact  # noqa: E402
from .layers import LeakyReLU, leaky_relu  # noqa: E402
from .network import ChannelAttentionUNet, ModelConfig  # noqa: E402
from .predictor import PRECISIONS, Segmenter, load  # noqa: E402

__all__ = [
    "Artifact",
    "ChannelAttention",
    "ChannelAttentionUNet",
    "ChannelBlock",
    "LeakyReLU",
    "ModelConfig",
    "ModelLoadError",
    "PRECISIONS",
    "Segmenter",
    "export_torchscript",
    "leaky_relu",
    "load",
    "read_artifact",
]
