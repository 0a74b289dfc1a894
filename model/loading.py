"""``load``: a model file (or the bundled model) read, placed on a device and checked,
as a :class:`~model.predictor.Segmenter`; and ``read_metadata``, a file's config and
metadata without its code.

The one place that knows both formats: a file is a compiled package
(``model/compiled.py``) or a TorchScript artifact (``model/export.py``) by its contents,
never by its name. A TorchScript artifact is placed here: moved to the device and
precision, channels-last where that measured faster (:func:`measure_recipe` on CUDA),
frozen. A package was placed when it was compiled, for one device and precision.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Dict, Mapping

import torch

from .artifact import FORMATS, PACKAGE, TORCHSCRIPT, Artifact, ModelLoadError, checked_meta
from .compiled import is_package, read_meta, read_package
from .devices import resolve_device
from .export import read_artifact, read_artifact_meta
from .network import ModelConfig
from .precision import PRECISIONS, require
from .predictor import Segmenter
from .pretrained import default_artifact, default_package

__all__ = ["load", "measure_recipe", "read_metadata"]


def load(
    path: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    freeze: bool = True,
    channels_last: bool | None = None,
    format: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    meta: Mapping[str, Any] | None = None,
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
        cache_dir: where the bundled model is cached (its TorchScript artifact, packages
            and precision record); default ``model.pretrained.cache_dir()``
            (``CHANSEG_CACHE_DIR``, else ``~/.cache/chanseg``). A server passes its setting.
        meta: metadata that replaces the file's own for this load: ``name`` and
            ``version`` (Triton's repository layout names a model by its folder and a
            version by its sub-folder), ``max_batch`` (the largest batch it may run).

    Raises:
        ModelLoadError: missing/corrupt file, unknown device, precision or format,
            a precision the device cannot run, or a package compiled for another
            device, precision, torch or CPU.

    Example:
        >>> seg = model.load()          # doctest: +SKIP
        >>> seg.predict(image).shape    # (H, W) uint8 class ids
    """
    if precision not in (*PRECISIONS, "auto"):
        raise ModelLoadError(f"unknown precision {precision!r}: use auto or one of {', '.join(PRECISIONS)}")
    if format not in ("auto", *FORMATS):
        raise ModelLoadError(f"unknown format {format!r}: use one of auto, {', '.join(FORMATS)}")
    dev = resolve_device(device)
    if path is not None and is_package(path):
        if format == TORCHSCRIPT:
            raise ModelLoadError(f"{path} is a compiled package, not a TorchScript artifact")
        return _from_package(_relabelled(read_package(path, dev), meta), dev, precision)
    if path is None and format != TORCHSCRIPT:
        found = default_package(dev, precision, build=format == PACKAGE, directory=cache_dir)
        if found is not None:
            return _from_package(_relabelled(found, meta), dev, precision)
    elif format == PACKAGE:
        raise ModelLoadError(
            f"{path} is a TorchScript artifact: compile it with python -m model compile --model {path}"
        )
    if precision == "auto":
        precision = "fp32"  # measured reduced precisions come with compiled packages
    require(precision, dev)
    artifact = _relabelled(default_artifact(cache_dir) if path is None else read_artifact(path), meta)
    if channels_last is None and dev.type == "cuda":
        recipe = measure_recipe(artifact, dev, precision, freeze)
        channels_last = recipe["channels_last"]
        torch.backends.cudnn.benchmark = recipe["cudnn_benchmark"]  # process-wide, as cuDNN has it
    else:
        recipe = None
        if channels_last is None:
            channels_last = True  # measured on CPU: ~1.2-1.4x faster (docs/performance.md, "The model alone")
    module = _placed(artifact, dev, precision, channels_last, freeze)
    segmenter = _checked(Segmenter(module, artifact, dev, precision, channels_last))
    segmenter.recipe = recipe
    return segmenter


def _relabelled(artifact: Artifact, meta: Mapping[str, Any] | None) -> Artifact:
    """``artifact`` with ``meta`` over its own metadata (checked as a file's is)."""
    if not meta:
        return artifact
    return dataclasses.replace(artifact, meta=checked_meta(artifact.path, {**artifact.meta, **meta}))


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


def read_metadata(path: str | os.PathLike) -> tuple[ModelConfig, Dict[str, Any]]:
    """The config and metadata of an artifact or a compiled package, read from the archive
    without loading its code (a model repository's index lists files this way).

    Raises:
        ModelLoadError: not a chanseg artifact or package.
    """
    return read_meta(path) if is_package(path) else read_artifact_meta(path)
