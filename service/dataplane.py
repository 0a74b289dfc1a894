"""The Open Inference Protocol's data plane: what an infer, metadata or readiness call
means, whichever protocol brought it. The HTTP endpoints (:mod:`service.routes.v2`) and
the gRPC servicer (:mod:`service.grpc_server`) decode their request with their codec
(:mod:`service.v2_codec`, :mod:`service.grpc_codec`), call one function here, and encode
what it returns; nothing here knows HTTP or gRPC. (KServe's layering: ``infer_type`` ->
``dataplane`` -> ``rest`` and ``grpc`` endpoints.)

The model's v2 inputs and outputs:

- inputs (exactly one per request): ``IMAGE``, ``UINT8 [N, H, W, 3]`` RGB pixels, or
  ``IMAGE_BYTES``, ``BYTES [N]`` (or ``[N, 1]``, as the metadata describes it) encoded image files;
- outputs: ``MASK`` ``UINT8 [N, H, W]`` class ids (by default); when requested,
  ``PROBABILITIES`` ``FP32 [N, C, H, W]``, ``CONFIDENCE`` ``UINT8 [N, H, W]`` (the top
  class's probability x 255) and ``MASK_RLE`` ``BYTES [N]`` (per image a JSON document: per
  class present its COCO compressed RLE, as ``/predict?format=rle``).

What a request asks for is checked before memory is spent on it: the image count, pixel
sizes and the output's size before tensors are materialised (an output over the
per-request limit is a 413 that says what to ask for instead).
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import model

from .budget import MIB
from .context import RequestContext
from .errors import InvalidRequest, NotFound, PayloadTooLarge, VersionNotLoaded
from .imaging import size_problem
from .interface import (
    CONFIDENCE,
    IMAGE,
    IMAGE_BYTES,
    MASK,
    MASK_RLE,
    PROBABILITIES,
    ServedModel,
    v2_inputs,
    v2_outputs,
)
from .pipeline import mask_rles, mask_rles_cost, pool_call, preprocess, reserve_output, segment
from .v2_codec import DTYPES, InferRequest, Output, Tensor, V2Error, V2TooLarge

__all__ = [
    "served_model", "server_metadata", "model_metadata", "model_config", "model_statistics", "live", "ready", "infer",
    "check_output_size", "outputs_for",
]  # fmt: skip

# Peak memory per element of a JSON output while it is written (the array, its text
# in pieces, the joined body): measured 5.5 (class ids) and 44 (floats) here.
_JSON_BYTES_PER_ELEMENT = {"UINT8": 8, "FP32": 56}
_OUTPUTS = (MASK, PROBABILITIES, CONFIDENCE, MASK_RLE)
SHARED_MEMORY_REFUSED = (
    "chanseg does not implement Triton's {kind} shared-memory extension (no region can be registered): "
    "send tensors in the request body (the binary tensor data extension), which a co-located client "
    "writes at memory speed"
)


def served_model(state, name: str, version: Optional[str]) -> ServedModel:
    """The version serving ``name`` (and ``version``, when given), else 404: ``VersionNotLoaded``
    for another version the model repository holds (it says which one serves)."""
    seg = state.segmenter
    if seg is None or name != seg.name:
        raise NotFound(f"unknown model '{name}'; this server serves '{seg.name if seg else '?'}'")
    if version is not None and version != seg.version:
        if state.repository is not None and version in state.repository.versions(name):
            raise VersionNotLoaded(
                f"version '{version}' of model '{name}' is in the model repository but not loaded: version "
                f"'{seg.version}' serves (chanseg serves one version of a model at a time; load another through "
                "the repository's load call)"
            )
        raise NotFound(f"unknown version '{version}' of model '{name}'; available: '{seg.version}'")
    return seg


def server_metadata(state) -> dict:
    """Triton's tools read ``extensions``. ``statistics`` is listed while the serving version
    is a number (Triton's versions are; a Triton-layout repository's are): perf_analyzer
    reads the list and, seeing ``statistics``, parses each version as an integer and stops
    on a content hash. The statistics routes answer either way."""
    extensions = ["binary_tensor_data", "model_configuration"]
    seg = state.segmenter
    extensions += ["statistics"] if seg is not None and seg.version.isdigit() else []
    extensions += ["model_repository"] if state.settings.model_repository else []
    return {"name": "chanseg", "version": model.__version__, "extensions": extensions}


def live(state) -> bool:
    return state.unhealthy() is None


def ready(state) -> bool:
    return state.serving


def model_metadata(state, name: str, version: Optional[str]) -> dict:
    seg = served_model(state, name, version)
    return {
        "name": seg.name,
        "versions": [seg.version],
        "platform": f"pytorch_{seg.format}",
        "inputs": v2_inputs(seg),
        "outputs": v2_outputs(seg),
        "parameters": {
            "classes": list(seg.config.class_names),
            "inputs": "exactly one of IMAGE, IMAGE_BYTES",
        },
    }


def model_config(state, name: str, version: Optional[str]) -> dict:
    """Triton's model configuration (``GET /v2/models/{name}/config``, gRPC ``ModelConfig``)
    of the version serving ``name``: what ``perf_analyzer`` and Triton's tools read.

    ``max_batch_size`` is the most images one request may carry (MAX_IMAGES_PER_REQUEST):
    dims leave the batch out, as Triton's do. Both inputs are optional (a request sends
    exactly one); ``IMAGE_BYTES`` has dims ``[1]`` (requests may send ``[N]`` or ``[N, 1]``),
    the output ``MASK_RLE`` dims ``[1]`` reshaped to ``[]`` (Triton's way to write ``[N]``). ``dynamic_batching`` is the batcher's: its batch size
    (MAX_BATCH_SIZE, measured or set) and delay; ``instance_group`` its device and streams."""
    seg = served_model(state, name, version)
    s = state.settings
    classes = seg.config.num_classes
    device = seg.device
    group = {
        "name": f"{seg.name}_0",
        "kind": "KIND_GPU" if device.type == "cuda" else "KIND_CPU",
        "count": state.streams,
    }
    if device.type == "cuda":
        group["gpus"] = [device.index or 0]
    return {
        "name": seg.name,
        "platform": f"pytorch_{seg.format}",
        "backend": "chanseg",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": s.max_images_per_request,
        "input": [
            {
                "name": IMAGE,
                "data_type": "TYPE_UINT8",
                "format": "FORMAT_NHWC",
                "dims": [-1, -1, 3],
                "optional": True,
            },
            {"name": IMAGE_BYTES, "data_type": "TYPE_STRING", "dims": [1], "optional": True},
        ],
        "output": [
            {"name": MASK, "data_type": "TYPE_UINT8", "dims": [-1, -1]},
            {"name": PROBABILITIES, "data_type": "TYPE_FP32", "dims": [classes, -1, -1]},
            {"name": CONFIDENCE, "data_type": "TYPE_UINT8", "dims": [-1, -1]},
            {"name": MASK_RLE, "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}},
        ],
        "dynamic_batching": {
            "preferred_batch_size": [state.max_batch_size] if state.max_batch_size else [],
            "max_queue_delay_microseconds": int(s.max_batch_delay_ms * 1000),
        },
        "instance_group": [group],
        "parameters": {
            "classes": {"string_value": ",".join(seg.config.class_names)},
            "input_size": {"string_value": "x".join(map(str, seg.config.input_size))},
        },
    }


def model_statistics(state, name: Optional[str], version: Optional[str]) -> dict:
    """Triton's statistics extension: ``{"model_stats": [...]}`` for ``name`` (every model
    when None; a name this server never served is 404), each version since it was loaded."""
    rows = state.statistics.report(name or None, version or None)
    if name and not rows:
        seg = state.segmenter
        what = f"version '{version}' of model '{name}'" if version else f"model '{name}'"
        raise NotFound(f"no statistics for {what}; this server serves '{seg.name if seg else '?'}'")
    return {"model_stats": rows}


async def infer(state, seg: ServedModel, context: RequestContext, req: InferRequest, parse_lease=None):
    """An infer request, decoded, to its outputs (to encode) and timings. ``parse_lease``:
    the memory of the request's parsed form; once its tensor is materialised, it keeps only
    what the images take until they are prepared (then it is released), so a request that
    waits for decoding memory does not hold its parse's peak meanwhile: eight 1024x1024
    JSON images at once held the whole work budget that way, and each waited for the
    others until its deadline."""
    s = state.settings
    try:
        tensor = _input(req.inputs, s)
    except V2TooLarge as exc:
        raise PayloadTooLarge(str(exc)) from None
    except V2Error as exc:
        raise InvalidRequest(str(exc)) from None
    req.inputs = []  # the caller keeps req: only ``tensor`` holds the parsed data, until it is materialised
    wanted = req.outputs or {MASK: req.binary_default}
    unknown = set(wanted) - set(_OUTPUTS)
    if unknown:
        raise InvalidRequest(f"unknown output(s) {sorted(unknown)}; this model has {', '.join(_OUTPUTS)}")
    classes = seg.config.num_classes

    def check(sizes: Sequence[Tuple[int, int]]) -> None:
        if len(set(sizes)) > 1:
            raise InvalidRequest(
                "the images of one request must have the same size (outputs are [N, H, W] tensors)"
            )
        check_output_size(wanted, len(sizes), sizes[0], classes, seg.config.input_size, s.max_output_bytes)

    if tensor.name == IMAGE:
        check([(tensor.shape[1], tensor.shape[2])] * tensor.shape[0])
    try:
        sources = await pool_call(state, _sources, tensor)
    except V2Error as exc:
        raise InvalidRequest(str(exc)) from None
    del tensor
    if parse_lease is not None:
        parse_lease.shrink(sum(getattr(source, "nbytes", None) or len(source) for _, source in sources))
    prepared = await preprocess(state, seg, context, sources, check=check)
    del sources
    if parse_lease is not None:
        parse_lease.release()

    results, timing = await segment(
        state, seg, context, prepared, probabilities=PROBABILITIES in wanted, confidence=CONFIDENCE in wanted
    )
    rles = None
    if MASK_RLE in wanted:  # each image's mask and runs in turn, their texts kept (at most its cost each)
        rle_cost = sum(mask_rles_cost(r.labels, prepared[0].size) for r in results)
        await reserve_output(state, context, rle_cost, "the masks' RLE")
        rles = await pool_call(state, rle_documents, seg, results, prepared[0].size)
    outputs = outputs_for(seg, wanted, results, prepared[0].size, rles)
    await reserve_output(state, context, _output_cost(outputs), "the response")
    return outputs, timing


def _input(inputs: List[Tensor], s) -> Tensor:
    """The one input, checked against the limits from its description alone."""
    if len(inputs) != 1:
        raise InvalidRequest(f"send exactly one input ({IMAGE} or {IMAGE_BYTES}), got {len(inputs)}")
    tensor = inputs[0]
    if tensor.name == IMAGE:
        if tensor.datatype != "UINT8":
            raise InvalidRequest(f"input {IMAGE} must be UINT8, got {tensor.datatype}")
        if len(tensor.shape) != 4 or tensor.shape[3] != 3:
            raise InvalidRequest(f"input {IMAGE} must have shape [N, H, W, 3], got {list(tensor.shape)}")
        n, h, w, _ = tensor.shape
        problem = size_problem(w, h, s.max_image_pixels, s.min_image_side)
        if problem is not None:
            too_large, message = problem
            raise (PayloadTooLarge if too_large else InvalidRequest)(message)
    elif tensor.name == IMAGE_BYTES:
        if tensor.datatype != "BYTES":
            raise InvalidRequest(f"input {IMAGE_BYTES} must be BYTES, got {tensor.datatype}")
        if len(tensor.shape) not in (1, 2) or tensor.shape[1:] not in ((), (1,)):
            raise InvalidRequest(
                f"input {IMAGE_BYTES} must have shape [N] or [N, 1], got {list(tensor.shape)}"
            )
        n = tensor.shape[0]
    else:
        raise InvalidRequest(f"unknown input '{tensor.name}'; this model takes {IMAGE} or {IMAGE_BYTES}")
    if n == 0:
        raise InvalidRequest("the input holds no image (N = 0)")
    if n > s.max_images_per_request:
        raise PayloadTooLarge(f"{n} images; at most {s.max_images_per_request} per request")
    return tensor


def _sources(tensor: Tensor) -> list:
    """(name, encoded bytes or (H, W, 3) pixels) per image: the tensor materialised."""
    if tensor.name == IMAGE:
        pixels = tensor.array()
        return [(f"{IMAGE}[{i}]", pixels[i]) for i in range(len(pixels))]
    return [(f"{IMAGE_BYTES}[{i}]", bytes(blob)) for i, blob in enumerate(tensor.items())]


def check_output_size(
    wanted: dict, n: int, size: Tuple[int, int], classes: int, input_size: Tuple[int, int], limit: int
) -> None:
    # MASK_RLE: bounded like MASK (a run takes at least one character, a pixel at most one run).
    per_output = {**_tensor_outputs(n, size, classes), MASK_RLE: ("UINT8", (n, *size))}
    for name, binary in wanted.items():
        datatype, shape = per_output[name]
        elements = int(np.prod(shape, dtype=object))
        itemsize = np.dtype(DTYPES[datatype]).itemsize
        cost = elements * (itemsize if binary else _JSON_BYTES_PER_ELEMENT[datatype])
        if cost > limit:
            if not binary and elements * itemsize <= limit:
                instead = (
                    f'ask for {name} in binary (parameters: {{"binary_data": true}}), or send fewer images'
                )
            elif name == PROBABILITIES:
                instead = (
                    f"ask for {MASK} only, or send fewer or smaller images ({PROBABILITIES} are computed at "
                    f"the model's input size, {input_size[1]}x{input_size[0]}, and only upsampled to yours)"
                )
            else:
                instead = "send fewer or smaller images"
            raise PayloadTooLarge(
                f"output {name} {datatype} {list(shape)} would take {cost / MIB:.0f} MiB to "
                f"{'send' if binary else 'encode as JSON'}, over the limit of {limit / MIB:.0f} MiB per response "
                f"(a quarter of the work budget of MEMORY_BUDGET_MB): {instead}"
            )


def _tensor_outputs(n: int, size: Tuple[int, int], classes: int) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """Each numeric output's datatype and shape for ``n`` images of ``size``."""
    h, w = size
    return {
        MASK: ("UINT8", (n, h, w)),
        PROBABILITIES: ("FP32", (n, classes, h, w)),
        CONFIDENCE: ("UINT8", (n, h, w)),
    }


def outputs_for(
    seg, wanted: dict, results: list, size: Tuple[int, int], rles: Optional[List[bytes]]
) -> List[Output]:
    """The outputs asked for, each filled when the response is encoded (``MASK_RLE`` made beforehand)."""
    # Each numeric output: how an image's tensor is upsampled to its size, and which tensor.
    sources = {
        MASK: (seg.restore, "labels"), PROBABILITIES: (seg.probabilities, "logits"), CONFIDENCE: (seg.restore, "confidence"),
    }  # fmt: skip
    outputs = []
    for name, (datatype, shape) in _tensor_outputs(len(results), size, seg.config.num_classes).items():
        if name in wanted:
            upsample, field = sources[name]
            fill = _filled(upsample, [getattr(r, field) for r in results], size)
            outputs.append(Output(name, datatype, shape, wanted[name], fill))
    if MASK_RLE in wanted:
        outputs.append(Output(MASK_RLE, "BYTES", (len(results),), wanted[MASK_RLE], items=rles))
    return outputs


def _filled(upsample, tensors: list, size: Tuple[int, int]):
    """An output's ``fill``: each image's ``upsample(tensor, size, out=...)`` into its slice."""

    def fill(out: np.ndarray) -> None:
        for i, tensor in enumerate(tensors):
            upsample(tensor, size, out=out[i])

    return fill


def rle_documents(seg, results: list, size: Tuple[int, int]) -> List[bytes]:
    """Per image, its classes' COCO RLEs as one JSON document (``MASK_RLE``); one full-size mask at a time."""
    return [json.dumps(mask_rles(seg, r.labels, size), separators=(",", ":")).encode() for r in results]


def _output_cost(outputs: List[Output]) -> int:
    total = MIB
    for out in outputs:
        if out.binary:
            total += out.nbytes
        elif out.items is not None:  # JSON strings: the text, and the bytes it came from
            total += 2 * out.nbytes
        else:
            total += (
                out.nbytes // np.dtype(DTYPES[out.datatype]).itemsize * _JSON_BYTES_PER_ELEMENT[out.datatype]
            )
    return total
