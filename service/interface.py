"""What the server needs of a model: :class:`ServedModel`, the whole contract.

The service calls nothing else on a model. ``model.Segmenter`` implements it (the
bundled network, a compiled package, an imported TorchScript model); so can any
object with these members: ``tests/service/fake_model.py`` serves every endpoint
with a model that has no network at all.

The stages, in the order a request meets them (each on the thread the server
gives it; only ``logits``/``labels``/``infer`` run torch work, on the inference
thread, and ``prepare``/``restore``/``probabilities``/``class_counts`` must not
start torch's parallel CPU kernels, see ``model.preprocess.resize_image``):

1. ``prepare(image)``: an ``(H, W, 3)`` uint8 array (or PIL image) -> an
   ``(h, w, 3)`` uint8 CPU tensor at ``config.input_size``, on the I/O pool.
2. ``logits(prepared)``: a batch -> ``(N, classes, h, w)`` logits on the device;
   ``labels(logits)`` -> ``(N, h, w)`` uint8 class ids on the CPU; ``infer`` is
   the two together (warm-up and the batch-size measurement time it).
3. ``restore(labels, size, out)`` -> the ``(H, W)`` mask at the image's size
   (for RLE the server asks for the mask's transpose: ``restore(labels.T, (W, H))``,
   a transposed, non-contiguous tensor, which nearest restoring gives exactly);
   (``restore`` also upsamples the ``(h, w)`` uint8 confidence map the server makes
   from the logits with ``model.predictor.top_probability``);
   ``probabilities(logits, size, out)`` -> ``(classes, H, W)`` float32 softmax;
   ``class_counts(labels, size, classes)`` -> pixels per class of the restored
   mask, without making it; on the I/O pool.

The v2 tensor metadata (KServe's ``get_input_types``/``get_output_types``) follows
from the contract: :func:`v2_inputs` and :func:`v2_outputs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
import torch

from model import ModelConfig

__all__ = [
    "ServedModel", "v2_inputs", "v2_outputs", "IMAGE", "IMAGE_BYTES", "MASK", "PROBABILITIES", "CONFIDENCE", "MASK_RLE",
]  # fmt: skip

IMAGE, IMAGE_BYTES = "IMAGE", "IMAGE_BYTES"  # v2 inputs: pixels, or encoded files
MASK, PROBABILITIES = "MASK", "PROBABILITIES"  # v2 outputs
CONFIDENCE, MASK_RLE = "CONFIDENCE", "MASK_RLE"  # v2 outputs: top-class probability x 255, per-class COCO RLE


@runtime_checkable
class ServedModel(Protocol):
    """A segmentation model the server can serve."""

    config: ModelConfig  # classes, input size (h, w), normalisation mean/std
    device: torch.device  # where it runs
    precision: str  # fp32, fp16 or bf16
    format: str  # how it is stored: torchscript, package (a compiled package), ...

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def max_batch(self) -> Optional[int]:
        """The largest batch it runs (a compiled package's bound), or None for no limit."""

    @property
    def path(self) -> Optional[Path]:
        """The file it was loaded from (its digest keys the batch-size measurement), if any."""

    def prepare(self, image: Any) -> torch.Tensor: ...

    def logits(self, prepared: Sequence[torch.Tensor]) -> torch.Tensor: ...

    def labels(self, logits: torch.Tensor) -> torch.Tensor: ...

    def infer(self, prepared: Sequence[torch.Tensor]) -> torch.Tensor: ...

    def restore(
        self, labels: torch.Tensor, size: Tuple[int, int], out: Optional[np.ndarray] = None
    ) -> np.ndarray: ...

    def probabilities(
        self, logits: torch.Tensor, size: Tuple[int, int], out: Optional[np.ndarray] = None
    ) -> Any: ...

    def class_counts(self, labels: torch.Tensor, size: Tuple[int, int], num_classes: int) -> np.ndarray: ...


def v2_inputs(served: ServedModel) -> List[dict]:
    """The v2 model metadata's inputs: exactly one of them per request. ``IMAGE_BYTES`` is
    ``[N, 1]`` as Triton would describe it (its model configuration's dims are ``[1]``, which
    perf_analyzer reads); ``[N]`` is served as well."""
    return [
        {"name": IMAGE, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
        {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [-1, 1]},
    ]


def v2_outputs(served: ServedModel) -> List[dict]:
    """The v2 model metadata's outputs, at each image's own size. ``MASK_RLE``: per image
    one JSON document, ``{class name: {"size": [H, W], "counts": COCO compressed RLE}}``."""
    return [
        {"name": MASK, "datatype": "UINT8", "shape": [-1, -1, -1]},
        {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, served.config.num_classes, -1, -1]},
        {"name": CONFIDENCE, "datatype": "UINT8", "shape": [-1, -1, -1]},
        {"name": MASK_RLE, "datatype": "BYTES", "shape": [-1]},
    ]
