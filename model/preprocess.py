"""Image conversion and normalisation shared by training and inference.

One code path turns user images into network input, so what the network saw
in training is what it sees when serving.
"""

from __future__ import annotations

import functools
from typing import List, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from .network import ModelConfig

__all__ = [
    "ImageLike",
    "to_rgb_array",
    "to_rgb_image",
    "to_rgb_tensor",
    "prepare_image",
    "normalize",
    "resize_batch",
    "resize_image",
    "nearest_indices",
]

ImageLike = Union[Image.Image, np.ndarray, Tensor]


# Rows converted per step where a conversion needs wider integers or floats:
# the temporaries stay a few MB whatever the image's size.
_STRIP_PIXELS = 1 << 20


def _strips(height: int, width: int):
    step = max(1, _STRIP_PIXELS // max(1, width))
    for top in range(0, height, step):
        yield slice(top, min(height, top + step))


def _grey_to_l(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey to 8 bits, scaled by the value range of the mode
    (PIL's convert() clips everything above 255 to white), in strips: never a
    float64 copy of the whole image."""
    data = np.asarray(image)
    out = np.empty(data.shape, dtype=np.uint8)
    if image.mode.startswith("I;16"):
        # round(v * 255 / 65535) == round(v / 257); never a tie, since 257 is odd
        for rows in _strips(*data.shape):
            out[rows] = (data[rows].astype(np.uint32) + 128) // 257
    else:
        top = max(float(data.max()), 1.0)
        for rows in _strips(*data.shape):
            out[rows] = np.clip(data[rows] * (255.0 / top), 0, 255).round()
    del data
    return Image.fromarray(out, "L")


def to_rgb_image(image: Image.Image) -> Image.Image:
    """A PIL image of any mode as an RGB (or, for grey, "L") PIL image.

    Grey stays one band: resizing it and then converting to RGB gives the same
    pixels as the other way round, at a quarter of the memory. Transparent
    pixels are composited on black (``paste`` with the alpha as mask: the same
    values as ``Image.alpha_composite`` on opaque black, at half the memory).
    """
    if image.mode in ("RGB", "L"):
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _grey_to_l(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (0, 0, 0))
        out.paste(rgba, mask=rgba)
        return out
    return image.convert("RGB")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    rgb = to_rgb_image(image)
    return rgb if rgb.mode == "RGB" else rgb.convert("RGB")


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Any supported image as an ``(H, W, 3)`` uint8 array.

    Accepts PIL images of any mode (grey, 16-bit, RGBA, palette, CMYK, ...),
    and uint8 arrays or tensors shaped ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)``
    or ``(H, W, 4)`` (alpha dropped).
    """
    if isinstance(image, Image.Image):
        return np.asarray(_pil_to_rgb(image))
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image has no pixels: {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[..., :3]
    return image


def to_rgb_tensor(image: ImageLike) -> Tensor:
    """Like :func:`to_rgb_array`, as an ``(H, W, 3)`` uint8 tensor; tensors stay on their device."""
    if isinstance(image, Tensor) and image.dtype == torch.uint8 and image.dim() == 3 and image.shape[2] == 3:
        return image
    array = np.ascontiguousarray(to_rgb_array(image))
    if not array.flags.writeable:  # PIL hands out read-only buffers; torch wants to own them
        array = array.copy()
    return torch.from_numpy(array)


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``(H, W, 3)`` uint8 array -> ``(h, w, 3)``: bilinear, antialiased when shrinking
    (PIL's, which ``resize_batch`` matches within one grey level).

    Runs on the calling thread only. Torch's CPU kernels would start an OpenMP
    thread team in every thread that calls them, and more teams than cores
    slows every forward pass in the process (measured: 42 -> 52 ms per image
    here with one extra team), so the host-side stages use PIL and numpy.
    """
    h, w = int(size[0]), int(size[1])
    if image.shape[0] == h and image.shape[1] == w:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def prepare_image(image: ImageLike, size: Sequence[int]) -> np.ndarray:
    """Any image -> ``(h, w, 3)`` uint8 array at ``size = (h, w)``: :func:`to_rgb_array`
    followed by :func:`resize_image`, the same pixels.

    A PIL image is converted and resized in PIL without a full-size numpy copy,
    so a large decoded image costs its own pixels and little more (a 6000x6000
    RGB image: 144 MB as PIL holds it; the array copies would add 216 MB).
    """
    h, w = int(size[0]), int(size[1])
    if not isinstance(image, Image.Image):
        return resize_image(to_rgb_array(image), (h, w))
    small = to_rgb_image(image)
    if small.size != (w, h):
        small = small.resize((w, h), Image.Resampling.BILINEAR)
    if small.mode != "RGB":
        small = small.convert("RGB")
    return np.array(small)


@functools.lru_cache(maxsize=256)
def nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of each of ``dst`` output positions, as torch's ``nearest-exact``
    computes them (float32 arithmetic, so the results agree bit for bit). Cached (a
    server restores masks of the same few sizes over and over); read-only."""
    scale = np.float32(src / dst)
    index = np.floor((np.arange(dst, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64)
    index = np.minimum(index, src - 1)
    index.flags.writeable = False
    return index


def normalize(images: Tensor, config: ModelConfig, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(N, H, W, C)`` uint8 -> ``(N, C, H, W)`` normalised floats of ``dtype``."""
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    mean = torch.tensor(config.mean, device=x.device).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(config.std, device=x.device).view(1, -1, 1, 1) * 255.0
    return ((x - mean) / std).to(dtype).contiguous()


def resize_batch(images: Sequence[Tensor], size: Sequence[int], device: torch.device) -> Tensor:
    """Resize ``(H, W, 3)`` uint8 tensors to one ``(N, h, w, 3)`` uint8 batch on ``device``.

    Bilinear with antialiasing (as PIL does when shrinking); images already at
    ``size`` are copied unchanged.
    """
    h, w = int(size[0]), int(size[1])
    out: List[Tensor] = []
    for image in images:
        image = image.to(device, non_blocking=True)
        if image.shape[0] != h or image.shape[1] != w:
            x = image.permute(2, 0, 1).unsqueeze(0).to(torch.float32)
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            image = x.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
        out.append(image)
    return torch.stack(out)
