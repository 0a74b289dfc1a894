"""Datasets: deterministic synthetic shapes, and image/mask folders.

The synthetic set draws 1 to 6 ellipses (class 1), possibly rotated rectangles
(class 2) and triangles (class 3) on a smooth gradient, a low-frequency texture
or a flat colour, then adds noise. Image and mask are drawn with the same
aliased PIL primitives, so every mask pixel is exactly the class painted there
(the shape drawn last wins). Sample ``i`` of seed ``s`` depends on ``(s, i)``
alone: any subset can be regenerated anywhere, in any order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

__all__ = [
    "CLASS_NAMES",
    "Shape",
    "Sample",
    "synthetic_sample",
    "SyntheticShapes",
    "FolderDataset",
    "DatasetError",
]

CLASS_NAMES = ("background", "circle", "rectangle", "triangle")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset file is missing or inconsistent; the message names the file."""


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its class and the geometry it was drawn from.

    ``ellipse`` is ``(cx, cy, rx, ry)`` for class 1 (drawn axis-aligned);
    ``polygon`` holds the vertices for classes 2 and 3.
    """

    class_id: int
    polygon: Tuple[Tuple[float, float], ...] = ()
    ellipse: Tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def contains(self, x: float, y: float) -> bool:
        """Whether the point lies inside the shape's exact geometry."""
        if self.class_id == 1:
            cx, cy, rx, ry = self.ellipse
            return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0
        return _point_in_convex_polygon(x, y, self.polygon)


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8 class ids
    shapes: Tuple[Shape, ...]  # in drawing order


def _point_in_convex_polygon(x: float, y: float, poly: Sequence[Tuple[float, float]]) -> bool:
    sign = 0.0
    for (x0, y0), (x1, y1) in zip(poly, list(poly[1:]) + [poly[0]]):
        cross = (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)
        if cross == 0:
            return False
        if sign == 0:
            sign = cross
        elif (cross > 0) != (sign > 0):
            return False
    return True


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.choice(["gradient", "texture", "flat"], p=[0.45, 0.4, 0.15])
    if kind == "flat":
        return np.broadcast_to(rng.uniform(0, 255, 3), (h, w, 3)).astype(np.float32)
    if kind == "gradient":
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) / math.hypot(h, w) + 0.5
        t = np.clip(t, 0, 1)[..., None]
        return (c0 * (1 - t) + c1 * t).astype(np.float32)
    cells = int(rng.integers(2, 9))
    grid = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)


def _colour_far_from(rng: np.random.Generator, avoid: List[np.ndarray]) -> Tuple[int, int, int]:
    best, best_dist = None, -1.0
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        dist = min((float(np.linalg.norm(c - a)) for a in avoid), default=1e9)
        if dist >= 90:
            return tuple(int(v) for v in c)
        if dist > best_dist:
            best, best_dist = c, dist
    return tuple(int(v) for v in best)


def _random_shape(rng: np.random.Generator, h: int, w: int) -> Shape:
    class_id = int(rng.integers(1, 4))
    size = float(rng.uniform(12, 110))
    cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
    if class_id == 1:
        r = size / 2
        ratio = float(rng.uniform(0.6, 1.0))
        rx, ry = (r, r * ratio) if rng.random() < 0.5 else (r * ratio, r)
        return Shape(1, ellipse=(cx, cy, rx, ry))
    if class_id == 2:
        sw, sh = size, size * float(rng.uniform(0.4, 1.0))
        angle = 0.0 if rng.random() < 0.3 else float(rng.uniform(0, math.pi / 2))
        c, s = math.cos(angle), math.sin(angle)
        corners = [(-sw / 2, -sh / 2), (sw / 2, -sh / 2), (sw / 2, sh / 2), (-sw / 2, sh / 2)]
        return Shape(2, polygon=tuple((cx + x * c - y * s, cy + x * s + y * c) for x, y in corners))
    # Triangle: vertices on a circle, at least 70 degrees apart, so no slivers.
    r = size / 2
    while True:
        angles = np.sort(rng.uniform(0, 2 * math.pi, 3))
        gaps = np.diff(np.concatenate([angles, angles[:1] + 2 * math.pi]))
        if gaps.min() > math.radians(70):
            break
    return Shape(3, polygon=tuple((cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles))


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    if shape.class_id == 1:
        cx, cy, rx, ry = shape.ellipse
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
    else:
        draw.polygon(list(shape.polygon), fill=fill)


def synthetic_sample(seed: int, index: int, size: Tuple[int, int] = (256, 256)) -> Sample:
    """Sample ``index`` of the synthetic set with base seed ``seed``.

    Returns a :class:`Sample` with an ``(H, W, 3)`` uint8 image, an ``(H, W)``
    uint8 mask (0 background, 1 circle, 2 rectangle, 3 triangle) and the shapes
    in drawing order.
    """
    h, w = size
    rng = np.random.default_rng([seed, index])
    background = _background(rng, h, w)
    image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    mask = Image.new("L", (w, h), 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    avoid = [background.reshape(-1, 3).mean(0)]
    shapes = []
    for _ in range(int(rng.integers(1, 7))):
        shape = _random_shape(rng, h, w)
        colour = _colour_far_from(rng, avoid)
        avoid.append(np.asarray(colour, dtype=np.float64))
        _draw(draw_image, shape, colour)
        _draw(draw_mask, shape, shape.class_id)
        shapes.append(shape)
    pixels = np.asarray(image, dtype=np.float32)
    sigma = float(rng.uniform(0, 12))
    if sigma > 0:
        pixels = pixels + rng.normal(0, sigma, pixels.shape).astype(np.float32)
    return Sample(pixels.clip(0, 255).astype(np.uint8), np.asarray(mask), tuple(shapes))


def _to_tensors(image: np.ndarray, mask: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.array(image, dtype=np.uint8)), torch.from_numpy(mask.astype(np.int64))


class SyntheticShapes(Dataset):
    """``length`` synthetic samples of base seed ``seed``.

    Items are ``(image, mask)``: ``(H, W, 3)`` uint8 and ``(H, W)`` int64 tensors.
    """

    def __init__(self, length: int, seed: int = 0, size: Tuple[int, int] = (256, 256)) -> None:
        self.length, self.seed, self.size = length, seed, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        sample = synthetic_sample(self.seed, index, self.size)
        return _to_tensors(sample.image, sample.mask)


class FolderDataset(Dataset):
    """Pairs ``DIR/images/<stem>.(png|jpg|jpeg)`` with ``DIR/masks/<stem>.png``.

    Masks hold class ids as 8-bit grey or palette PNGs. Every pair is checked
    when the dataset is made: a missing mask, mismatched sizes or a class id
    ``>= num_classes`` raise :class:`DatasetError` naming the file. Items are
    resized to ``size`` (bilinear image, nearest mask) when given.
    """

    def __init__(self, root: str | Path, num_classes: int, size: Tuple[int, int] | None = None):
        root = Path(root)
        self.size = size
        image_dir, mask_dir = root / "images", root / "masks"
        if not image_dir.is_dir():
            raise DatasetError(f"{image_dir}: no such directory (expected DIR/images and DIR/masks)")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise DatasetError(f"{image_dir}: no .png/.jpg/.jpeg images")
        self.pairs: List[Tuple[Path, Path]] = []
        for image_path in images:
            mask_path = mask_dir / f"{image_path.stem}.png"
            if not mask_path.is_file():
                raise DatasetError(f"{mask_path}: missing mask for {image_path.name}")
            with Image.open(image_path) as im, Image.open(mask_path) as m:
                if im.size != m.size:
                    raise DatasetError(
                        f"{mask_path}: mask is {m.size[0]}x{m.size[1]} but "
                        f"{image_path.name} is {im.size[0]}x{im.size[1]}"
                    )
                mask = self._mask_array(m, mask_path)
            if mask.max() >= num_classes:
                raise DatasetError(f"{mask_path}: class id {int(mask.max())} >= num_classes ({num_classes})")
            self.pairs.append((image_path, mask_path))

    @staticmethod
    def _mask_array(mask: Image.Image, path: Path) -> np.ndarray:
        if mask.mode not in ("L", "P"):
            raise DatasetError(f"{path}: mask mode {mask.mode}; expected 8-bit grey or palette")
        return np.asarray(mask)  # for "P", the palette indices are the class ids

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as im, Image.open(mask_path) as m:
            image, mask = im.convert("RGB"), m.copy()
        if self.size is not None and image.size != (self.size[1], self.size[0]):
            image = image.resize((self.size[1], self.size[0]), Image.BILINEAR)
            mask = mask.resize((self.size[1], self.size[0]), Image.NEAREST)
        return _to_tensors(np.asarray(image), np.asarray(mask))
