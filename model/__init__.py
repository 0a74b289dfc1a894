"""chanseg's model package: a channel-attention U-Net for image segmentation.

Importable on its own (``import model``): it needs torch, numpy, pillow and
safetensors, never a web framework.

Example:
    >>> import model
    >>> seg = model.load()                      # the bundled default, cpu or cuda
    >>> mask = seg.predict(image)               # (H, W) uint8 class ids
"""

from .artifact import Artifact, ModelLoadError
from .blocks import ChannelAttention, ChannelBlock
from .export import export_torchscript, read_artifact
from .layers import LeakyReLU, leaky_relu
from .loading import load
from .network import ChannelAttentionUNet, ModelConfig
from .precision import PRECISIONS
from .predictor import Segmenter
from .version import __version__ as __version__  # the package's version, as pip has it

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
