"""``Segmenter``: a model on a device, ready to predict (``model.load`` builds one:
``model/loading.py``).

Prediction runs in three stages that a server can schedule apart
(``Segmenter.predict`` simply chains them):

1. ``prepare(image)``: any image -> ``(h, w, 3)`` uint8 tensor at the input
   size, on the host, whatever the device: this work runs in parallel with
   inference on other threads, and what waits for the device is small.
2. ``infer(batch)``: prepared images -> ``(N, h, w)`` uint8 labels at the input
   size, in one batched forward pass.
3. ``restore(labels, size)``: labels -> the mask at the image's own size, by
   nearest-neighbour upsampling of the argmax (the same as nearest upsampling
   of the logits followed by argmax; never invents classes at edges).

Each stage is deterministic and batch-independent: an image's mask is the same
alone or in any batch. ``prepare``, ``restore`` and ``probabilities`` use PIL
and numpy, never torch's CPU kernels: a server calls them from many threads,
and each thread that runs a parallel torch kernel keeps an OpenMP thread team
that slows the forward pass everywhere else (see ``preprocess.resize_image``).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .artifact import Artifact
from .network import ModelConfig
from .precision import PRECISIONS
from .preprocess import (
    ImageLike,
    nearest_indices,
    prepare_image,
    to_rgb_tensor,
)
from .regions import label_runs

__all__ = ["Segmenter", "top_probability"]


class Segmenter:
    """A model on a device. Build with :func:`load`.

    Attributes:
        config: the artifact's :class:`ModelConfig` (classes, input size, normalisation).
        meta: the artifact's metadata (name, version, ...).
        device, precision: where and in which dtype it runs.
    """

    def __init__(
        self,
        module: torch.jit.ScriptModule,
        artifact: Artifact,
        device: torch.device,
        precision: str,
        channels_last: bool = False,
    ):
        self.module = module
        self.artifact = artifact
        self.config: ModelConfig = artifact.config
        self.meta = artifact.meta
        self.device = device
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # The normalisation constants live on the device, made once, not per batch.
        self._mean = torch.tensor(self.config.mean, device=device).view(1, -1, 1, 1) * 255.0
        self._std = torch.tensor(self.config.std, device=device).view(1, -1, 1, 1) * 255.0
        self._staging: Tensor | None = None  # CUDA: pinned host memory a batch is stacked into
        self._copied = None  # CUDA: an event set when the last staged batch reached the device
        self.recipe: dict | None = None  # how load() chose to run it, when it measured (CUDA)

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def path(self):
        """The file it was loaded from (None for the bundled model built in memory)."""
        return self.artifact.path

    @property
    def class_names(self) -> Tuple[str, ...]:
        return self.config.class_names

    @property
    def max_batch(self) -> int | None:
        """The largest batch it runs (None: no limit): a compiled package's bound, or what
        ``load(meta={"max_batch": ...})`` gave (Triton's ``max_batch_size``)."""
        value = self.meta.get("max_batch")
        return int(value) if value else None

    @property
    def format(self) -> str:
        """``torchscript`` or ``package`` (a compiled package)."""
        return self.artifact.format

    def __repr__(self) -> str:
        return f"Segmenter(name={self.name!r}, version={self.version!r}, device={self.device}, precision={self.precision})"

    # -- stages ---------------------------------------------------------------

    def prepare(self, image: ImageLike) -> Tensor:
        """One image -> ``(h, w, 3)`` uint8 CPU tensor at the input size (PIL's
        antialiased bilinear resize). On every device: a queue of prepared images
        then holds input-size tensors, never full-size ones."""
        return to_rgb_tensor(prepare_image(image, self.config.input_size))

    @torch.inference_mode()
    def logits(self, prepared: Sequence[Tensor]) -> Tensor:
        """Prepared images -> logits ``(N, num_classes, h, w)`` in the model's dtype, on its device.

        Images not at the input size are resized on the host first (as ``prepare``
        does), so no image of any shape reaches a device kernel but the network."""
        x = self.to_device(prepared).permute(0, 3, 1, 2).to(torch.float32)
        x = ((x - self._mean) / self._std).to(self.dtype).contiguous(memory_format=self.memory_format)
        return self.module(x)

    def to_device(self, prepared: Sequence[Tensor]) -> Tensor:
        """Prepared images -> one ``(N, h, w, 3)`` uint8 batch on the device: stacked on
        the host and, on CUDA, copied once from pinned memory without blocking."""
        h, w = self.config.input_size
        images = [t if tuple(t.shape[:2]) == (h, w) else self.prepare(t.cpu()) for t in prepared]
        if not images:
            raise ValueError("no images")
        if self.device.type != "cuda" or all(t.device == self.device for t in images):
            return torch.stack([t.to(self.device) for t in images])
        n = len(images)
        if self._staging is None or self._staging.shape[0] < n:
            self._staging = torch.empty((n, h, w, 3), dtype=torch.uint8).pin_memory()
        if self._copied is not None:
            self._copied.synchronize()  # the previous batch's copy has read the buffer
        staged = torch.stack([t.cpu() for t in images], out=self._staging[:n])
        batch = staged.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return batch

    @torch.inference_mode()
    def infer(self, prepared: Sequence[Tensor]) -> Tensor:
        """Prepared images -> ``(N, h, w)`` uint8 class ids at the input size, on the CPU."""
        return self.labels(self.logits(prepared))

    @staticmethod
    @torch.inference_mode()
    def labels(logits: Tensor) -> Tensor:
        """Logits ``(N, C, h, w)`` -> ``(N, h, w)`` uint8 class ids on the CPU."""
        # max(1).indices measured ~10x faster than argmax(1) on CPU.
        return logits.max(1).indices.to(torch.uint8).cpu()

    @staticmethod
    def probabilities(
        logits: Tensor, size: Tuple[int, int], out: np.ndarray | None = None
    ) -> Tensor | np.ndarray:
        """One image's logits ``(C, h, w)`` -> float32 softmax ``(C, H, W)`` on the CPU
        (nearest). With ``out`` (a float32 ``(C, H, W)`` array) it is written there
        and returned: a server assembles a response without a second full-size copy."""
        x = logits.detach().float().cpu().numpy()
        x = np.exp(x - x.max(axis=0, keepdims=True))
        x /= x.sum(axis=0, keepdims=True)
        if out is not None:
            return _upsample(x, size, axes=(1, 2), out=out)
        return torch.from_numpy(_upsample(x, size, axes=(1, 2)))

    @staticmethod
    def restore(labels: Tensor, size: Tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
        """``(h, w)`` uint8 labels -> ``(H, W)`` uint8 mask for ``size = (H, W)`` (nearest),
        written into ``out`` when given."""
        return _upsample(labels.numpy(), size, axes=(0, 1), out=out)

    @staticmethod
    def class_counts(labels: Tensor, size: Tuple[int, int], num_classes: int) -> np.ndarray:
        """Pixels per class in ``restore(labels, size)``, without making that mask:
        each label counts as many times as nearest upsampling repeats its row and column."""
        small = labels.numpy()
        h, w = small.shape
        if (h, w) == (int(size[0]), int(size[1])):  # the mask is the labels: count them
            if num_classes <= _COMPARED_CLASSES:
                return np.array([np.count_nonzero(small == c) for c in range(num_classes)], np.int64)
            return np.bincount(small.ravel(), minlength=num_classes)[:num_classes].astype(np.int64)
        rows = np.bincount(nearest_indices(h, int(size[0])), minlength=h)
        cols = np.bincount(nearest_indices(w, int(size[1])), minlength=w)
        runs = label_runs(small, limit=small.size // 8)
        if runs is not None:  # a mask's few runs: each weighs its row's and columns' repeats
            run_rows, starts, ends, values = runs
            col_edge = np.concatenate(([0], np.cumsum(cols)))
            weights = rows[run_rows] * (col_edge[ends] - col_edge[starts])
        else:  # noise: each label weighs its own repeats
            values, weights = small.ravel(), np.outer(rows, cols).ravel()
        counts = np.bincount(values, weights=weights, minlength=num_classes)[:num_classes]
        return np.rint(counts).astype(np.int64)

    # -- one call ---------------------------------------------------------------

    def predict(
        self, images: ImageLike | Sequence[ImageLike], batch_size: int = 16
    ) -> np.ndarray | List[np.ndarray]:
        """Class masks: one ``(H, W)`` uint8 array per image, at the image's own size.

        ``images``: a PIL image, ``(H, W[, C])`` uint8 array or tensor (one image),
        an ``(N, H, W, C)`` array or tensor, or a list of any of these. A single
        image gives a single mask; anything else a list. Lists run in batches of
        ``batch_size``, one forward pass each.
        """
        items, single = _as_list(images)
        masks: List[np.ndarray] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            prepared = [self.prepare(im) for im in chunk]
            labels = self.infer(prepared)
            masks += [self.restore(lab, _size(im)) for lab, im in zip(labels, chunk)]
        return masks[0] if single else masks

    def predict_proba(
        self, images: ImageLike | Sequence[ImageLike], batch_size: int = 16
    ) -> np.ndarray | List[np.ndarray]:
        """Class probabilities: one ``(num_classes, H, W)`` float32 array per image.

        Softmax at the input size, nearest-upsampled to the image's size, so
        ``predict_proba(x).argmax(0)`` agrees with ``predict(x)`` (ties aside).
        """
        items, single = _as_list(images)
        out: List[np.ndarray] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            logits = self.logits([self.prepare(im) for im in chunk])
            out += [self.probabilities(lg, _size(im)).numpy() for lg, im in zip(logits, chunk)]
        return out[0] if single else out

    @torch.inference_mode()
    def check(self, batch_size: int = 1) -> None:
        """Run one dummy batch at the input size (raises if the device/dtype cannot)."""
        h, w = self.config.input_size
        dummy = torch.zeros(batch_size, h, w, 3, dtype=torch.uint8)
        self.infer(list(dummy))


@torch.inference_mode()
def top_probability(logits: Tensor) -> Tensor:
    """Logits ``(N, C, h, w)`` -> ``(N, h, w)`` uint8: the top class's softmax probability
    x 255, rounded (a confidence map; 255 = certain, 255 / C = a tie of all classes)."""
    x = logits.float()
    p = 1 / torch.exp(x - x.max(1, keepdim=True).values).sum(1)
    return (p * 255).round_().to(torch.uint8)


def _upsample(
    array: np.ndarray, size: Tuple[int, int], axes: Tuple[int, int], out: np.ndarray | None = None
) -> np.ndarray:
    """Nearest-exact resize of ``array`` along ``axes`` to ``size`` (torch's indices),
    into ``out`` when given."""
    h, w = array.shape[axes[0]], array.shape[axes[1]]
    if (h, w) == tuple(size):
        return _into(array, out)
    height, width = int(size[0]), int(size[1])
    if height < h:
        # Fewer rows than the array (a wide, flat image's mask): those rows first, so that the
        # columns are gathered on them alone, not on every row (8x8192 from 256x256 labels:
        # 1.4 ms and a 256x8192 array in between otherwise). Nearest is the same either way.
        rows = np.take(array, nearest_indices(h, height), axis=axes[0])
        return _into(_widen(rows, width, axes), out)
    # Columns first, on the small array; then whole rows, each a contiguous copy. The other
    # order gathers every output pixel one by one: 23.4 against 3.1 ms for a 4032x3024 mask.
    return np.take(_widen(array, width, axes), nearest_indices(h, height), axis=axes[0], out=out)


def _into(array: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``array``, or ``out`` with it copied in when given."""
    if out is None:
        return array
    out[...] = array
    return out


def _widen(array: np.ndarray, width: int, axes: Tuple[int, int]) -> np.ndarray:
    """``array`` resized to ``width`` along ``axes[1]`` (nearest-exact)."""
    w = array.shape[axes[1]]
    if w == width:
        return array
    factor = width // w
    if (
        array.dtype == np.uint8
        and axes == (0, 1)
        and array.ndim == 2
        and factor * w == width
        and factor in _BYTES_TIMES
        and width <= 1 << 23
    ):
        # A mask 2, 4 or 8 times as wide (a 1024x1024 image's, from 256x256): each label's
        # byte repeated by one multiply of the bytes read as wider integers, 0.03 against
        # 0.14 ms for the gather. Those factors' nearest-exact indices are exactly i // factor
        # up to 2**23 columns (torch computes them in float32; past that they drift).
        kind, ones = _BYTES_TIMES[factor]
        return (array.astype(kind, order="C") * kind(ones)).view(np.uint8)
    return np.take(array, nearest_indices(w, width), axis=axes[1])


# Up to this many classes, labels at the image's size are counted by one comparison per
# class (~5 us each on a 256x256 mask) rather than by np.bincount (~85 us: it widens
# every label to 64 bits first).
_COMPARED_CLASSES = 12
# A byte repeated 2, 4 or 8 times: the byte times 0x01...01 in an integer that wide.
_BYTES_TIMES = {2: (np.uint16, 0x0101), 4: (np.uint32, 0x01010101), 8: (np.uint64, 0x0101010101010101)}


def _as_list(images) -> Tuple[list, bool]:
    if isinstance(images, (list, tuple)):
        return list(images), False
    if isinstance(images, (np.ndarray, Tensor)) and images.ndim == 4:
        return list(images), False
    return [images], True


def _size(image: ImageLike) -> Tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[0]), int(image.shape[1])
