"""``load`` and ``Segmenter``: a TorchScript artifact placed on a device, ready to predict.

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

import os
import re
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .export import Artifact, ModelLoadError, read_artifact
from .network import ModelConfig
from .preprocess import (
    ImageLike,
    nearest_indices,
    prepare_image,
    to_rgb_tensor,
)

__all__ = [
    "FORMATS",
    "PRECISIONS",
    "Segmenter",
    "load",
    "measure_recipe",
    "resolve_device",
    "top_probability",
]

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# The device names chanseg accepts everywhere (load, the CLI, the server's DEVICE).
DEVICE_NAMES = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda``/``cuda:N`` checked to exist."""
    if not isinstance(device, torch.device) and not DEVICE_NAMES.fullmatch(str(device)):
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ModelLoadError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return dev


FORMATS = ("auto", "torchscript", "package")


def load(
    path: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    freeze: bool = True,
    channels_last: bool | None = None,
    format: str = "auto",
) -> "Segmenter":
    """Load a model (the bundled default when ``path`` is None).

    Two formats, told apart by the file's contents: the TorchScript artifact
    (:func:`model.export_torchscript`; device-neutral, placed and frozen here) and
    the compiled package (:mod:`model.compiled`; torch.export + AOTInductor, for one
    device, precision and CPU, faster: ``benchmarks/model_speed.py``).

    Args:
        path: an artifact or a package; None: the bundled model.
        device: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``fp16``, ``bf16`` (refused where the hardware lacks
            it), or ``auto``: the precision ``python -m model compile --precision
            auto`` chose for this machine (fastest within 0.005 mIoU of fp32),
            fp32 when nothing was compiled.
        freeze: apply ``torch.jit.freeze`` to a TorchScript artifact.
        channels_last: NHWC memory format for TorchScript; ``None``: on CPU yes,
            on CUDA measured at load with ``cudnn.benchmark`` on and off
            (:func:`measure_recipe`; the choice is ``Segmenter.recipe``).
        format: ``auto``: for the bundled model, the package compiled for this
            machine when there is one (``python -m model compile``), else
            TorchScript; ``torchscript``; ``package`` (the bundled model is
            compiled into the cache when missing: tens of seconds).

    Raises:
        ModelLoadError: missing/corrupt file, unknown device, precision or format,
            a precision the device cannot run, or a package compiled for another
            device, precision, torch or CPU.

    Example:
        >>> seg = model.load()          # doctest: +SKIP
        >>> seg.predict(image).shape    # (H, W) uint8 class ids
    """
    from .compiled import is_package, read_package
    from .precision import require

    if precision not in (*PRECISIONS, "auto"):
        raise ModelLoadError(f"unknown precision {precision!r}: use auto or one of {', '.join(PRECISIONS)}")
    if format not in FORMATS:
        raise ModelLoadError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    dev = resolve_device(device)
    if path is not None and is_package(path):
        if format == "torchscript":
            raise ModelLoadError(f"{path} is a compiled package, not a TorchScript artifact")
        return _from_package(read_package(path, dev), dev, precision)
    if path is None and format != "torchscript":
        from .pretrained import default_package

        found = default_package(dev, precision, build=format == "package")
        if found is not None:
            return _from_package(found, dev, precision)
    elif format == "package":
        raise ModelLoadError(
            f"{path} is a TorchScript artifact: compile it with python -m model compile --model {path}"
        )
    if precision == "auto":
        precision = "fp32"  # measured reduced precisions come with compiled packages
    require(precision, dev)
    if path is None:
        from .pretrained import default_artifact

        artifact = default_artifact()
    else:
        artifact = read_artifact(path)
    if channels_last is None and dev.type == "cuda":
        recipe = measure_recipe(artifact, dev, precision, freeze)
        channels_last = recipe["channels_last"]
        torch.backends.cudnn.benchmark = recipe["cudnn_benchmark"]  # process-wide, as cuDNN has it
    else:
        recipe = None
        if channels_last is None:
            channels_last = True  # measured on CPU: ~1.2-1.4x faster (README, "Model speed")
    module = _placed(artifact, dev, precision, channels_last, freeze)
    segmenter = _checked(Segmenter(module, artifact, dev, precision, channels_last))
    segmenter.recipe = recipe
    return segmenter


def _placed(artifact: Artifact, dev: torch.device, precision: str, channels_last: bool, freeze: bool):
    module = artifact.module.to(device=dev, dtype=PRECISIONS[precision]).eval()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return torch.jit.freeze(module) if freeze else module


def measure_recipe(
    artifact: Artifact, dev: torch.device, precision: str, freeze: bool = True, batch: int = 8, runs: int = 5
) -> dict:
    """Time each way to run a TorchScript artifact on ``dev`` (memory format, and on
    CUDA ``cudnn.benchmark`` on and off) and return the fastest: ``{"channels_last",
    "cudnn_benchmark", "ms"}``, ``ms`` the median batch time of every candidate.

    Each candidate gets three untimed calls (TorchScript profiles a shape, then
    fuses; cuDNN autotunes) before ``runs`` timed ones. ``load`` runs this on CUDA,
    where the best recipe differs by precision and GPU; the CPU's was measured once."""
    import statistics
    import time

    cudnn = (False, True) if dev.type == "cuda" else (False,)
    h, w = artifact.config.input_size
    images = list(
        torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    )
    before = torch.backends.cudnn.benchmark
    times: dict = {}
    try:
        for channels_last in (False, True):
            segmenter = Segmenter(
                _placed(artifact, dev, precision, channels_last, freeze),
                artifact,
                dev,
                precision,
                channels_last,
            )
            for benchmark in cudnn:
                torch.backends.cudnn.benchmark = benchmark
                for _ in range(3):
                    segmenter.infer(images)
                samples = []
                for _ in range(runs):
                    started = time.perf_counter()
                    segmenter.infer(images)  # ends in a copy to the host: the device is done
                    samples.append(time.perf_counter() - started)
                times[(channels_last, benchmark)] = statistics.median(samples) * 1000
    finally:
        torch.backends.cudnn.benchmark = before
    channels_last, benchmark = min(times, key=times.get)
    return {
        "channels_last": channels_last,
        "cudnn_benchmark": benchmark,
        "ms": {f"channels_last={c} cudnn_benchmark={b}": round(t, 2) for (c, b), t in times.items()},
    }


def _checked(segmenter: "Segmenter") -> "Segmenter":
    try:
        segmenter.check()
    except RuntimeError as exc:
        raise ModelLoadError(
            f"the model cannot run in {segmenter.precision} on {segmenter.device}: {exc}"
        ) from exc
    return segmenter


def _from_package(artifact: Artifact, dev: torch.device, precision: str) -> "Segmenter":
    compiled = str(artifact.meta.get("precision"))
    if precision not in ("auto", compiled):
        raise ModelLoadError(f"{artifact.path} is compiled for {compiled}, not {precision}")
    return _checked(
        Segmenter(artifact.module, artifact, dev, compiled, bool(artifact.meta.get("channels_last")))
    )


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
        """The largest batch a compiled package runs (None: no limit)."""
        value = self.meta.get("max_batch") if self.format == "aoti" else None
        return int(value) if value else None

    @property
    def format(self) -> str:
        """``torchscript`` or ``aoti`` (a compiled package)."""
        return str(self.meta.get("format")) if self.meta.get("format") == "aoti" else "torchscript"

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
            return np.bincount(small.ravel(), minlength=num_classes)[:num_classes].astype(np.int64)
        rows = np.bincount(nearest_indices(h, int(size[0])), minlength=h)
        cols = np.bincount(nearest_indices(w, int(size[1])), minlength=w)
        weights = np.outer(rows, cols).ravel()
        counts = np.bincount(small.ravel(), weights=weights, minlength=num_classes)[:num_classes]
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
        if out is None:
            return array
        out[...] = array
        return out
    rows, cols = nearest_indices(h, int(size[0])), nearest_indices(w, int(size[1]))
    tall = np.take(array, rows, axis=axes[0])
    if out is None:
        return np.ascontiguousarray(np.take(tall, cols, axis=axes[1]))
    return np.take(tall, cols, axis=axes[1], out=out)


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
