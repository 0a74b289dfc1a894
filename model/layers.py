"""Activations written by hand: ``leaky_relu`` and its module ``LeakyReLU``.

LeakyReLU (Maas et al., 2013, "Rectifier Nonlinearities Improve Neural Network
Acoustic Models") is f(x) = x for x > 0 and f(x) = negative_slope * x otherwise.
The project deliberately does not call torch's built-in leaky ReLU (why:
docs/design.md); this version is TorchScript-compatible and matches the built-in bit
for bit, gradients included, in fp32, fp16 and bf16 on CPU and CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["leaky_relu", "LeakyReLU"]


def leaky_relu(x: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """Apply LeakyReLU element-wise.

    Args:
        x: any tensor of floating dtype, shape ``(*)``.
        negative_slope: the slope used for ``x <= 0``.
        inplace: write the result into ``x`` and return ``x`` itself.

    Returns:
        A tensor of the shape and dtype of ``x``.

    ``torch.where(x > 0, x, x * slope)`` gives exactly the built-in's values:
    ``-0.0`` stays ``-0.0``, NaN stays NaN, and the gradient at 0 is
    ``negative_slope`` (the condition is strict, as in torch).

    Example:
        >>> leaky_relu(torch.tensor([-2.0, 0.0, 3.0]))
        tensor([-0.0200,  0.0000,  3.0000])
    """
    out = torch.where(x > 0, x, x * negative_slope)
    if inplace:
        return x.copy_(out)
    return out


class LeakyReLU(nn.Module):
    """Module form of :func:`leaky_relu` (the same arguments as torch's built-in module).

    Shape: input ``(*)``, output ``(*)``.

    Example:
        >>> LeakyReLU(0.1)(torch.tensor([-1.0, 1.0]))
        tensor([-0.1000,  1.0000])
    """

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return leaky_relu(x, self.negative_slope, self.inplace)

    def extra_repr(self) -> str:
        inplace = ", inplace=True" if self.inplace else ""
        return f"negative_slope={self.negative_slope}{inplace}"
