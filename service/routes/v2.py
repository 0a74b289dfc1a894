"""Open Inference Protocol (KServe v2 / Triton) REST endpoints.

Inputs (exactly one per request):
- ``IMAGE``: ``UINT8 [N, H, W, 3]`` RGB pixels;
- ``IMAGE_BYTES``: ``BYTES [N]`` encoded image files (PNG, JPEG, ...; base64 strings in JSON).
Outputs: ``MASK`` ``UINT8 [N, H, W]`` class ids (by default); ``PROBABILITIES``
``FP32 [N, C, H, W]`` only when requested. Requests share the batcher, limits,
deadlines, API key and metrics with ``/predict``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

import model

from ..deps import Authorized, Ready, State
from ..errors import (
    BadImage,
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequest,
    NoImage,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    responses,
)
from ..pipeline import deadline_of, postprocess, preprocess, segment
from ..v2_codec import V2Error, encode_infer_response, parse_infer_request

router = APIRouter(prefix="/v2", tags=["v2"])

IMAGE, IMAGE_BYTES = "IMAGE", "IMAGE_BYTES"
MASK, PROBABILITIES = "MASK", "PROBABILITIES"
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object", "required": ["inputs"]}}},
    }
}


_NOT_READY = responses(NotReady)
# Each route below answers at two paths (with and without a version).
_METADATA_ROUTE = dict(name="v2_model", dependencies=[Authorized], responses=responses(Unauthorized, NotFound))
_READY_ROUTE = dict(name="v2_model", responses=responses(NotFound, NotReady))
_INFER_ROUTE = dict(
    name="v2_infer",
    dependencies=[Authorized, Ready],
    openapi_extra=_INFER_BODY,
    responses=responses(
        InvalidRequest, BadImage, PayloadTooLarge, InferenceFailed, Overloaded, DeadlineExceeded, Unauthorized,
        NotFound,
    ),  # fmt: skip
)


def _model(state, name: str, version: Optional[str]):
    seg = state.segmenter
    if seg is None or name != seg.name:
        raise NotFound(f"unknown model '{name}'; this server serves '{seg.name if seg else '?'}'")
    if version is not None and version != seg.version:
        raise NotFound(f"unknown version '{version}' of model '{name}'; available: '{seg.version}'")
    return seg


@router.get("", name="v2_server")
async def server_metadata() -> dict:
    return {"name": "chanseg", "version": model.__version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", name="v2_health")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", name="v2_health", responses=_NOT_READY)
async def ready(state: State) -> JSONResponse:
    ok = state.ready and not state.draining
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}", **_METADATA_ROUTE)
@router.get("/models/{name}/versions/{version}", **_METADATA_ROUTE)
async def model_metadata(state: State, name: str, version: Optional[str] = None) -> dict:
    seg = _model(state, name, version)
    classes = seg.config.num_classes
    return {
        "name": seg.name,
        "versions": [seg.version],
        "platform": "pytorch_torchscript",
        "inputs": [
            {"name": IMAGE, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
            {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": MASK, "datatype": "UINT8", "shape": [-1, -1, -1]},
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes, -1, -1]},
        ],
        "parameters": {
            "classes": list(seg.config.class_names),
            "inputs": "exactly one of IMAGE, IMAGE_BYTES",
        },
    }


@router.get("/models/{name}/ready", **_READY_ROUTE)
@router.get("/models/{name}/versions/{version}/ready", **_READY_ROUTE)
async def model_ready(state: State, name: str, version: Optional[str] = None) -> JSONResponse:
    seg = _model(state, name, version)
    ok = state.ready and not state.draining
    return JSONResponse({"name": seg.name, "ready": ok}, status_code=200 if ok else 503)


@router.post("/models/{name}/infer", **_INFER_ROUTE)
@router.post("/models/{name}/versions/{version}/infer", **_INFER_ROUTE)
async def infer(request: Request, state: State, name: str, version: Optional[str] = None) -> Response:
    seg = _model(state, name, version)
    s = state.settings
    deadline = deadline_of(request, s.request_timeout_s)
    body = await request.body()  # size-limited by the middleware; no Content-Type needed
    try:
        req = parse_infer_request(body, request.headers.get("inference-header-content-length"))
    except V2Error as exc:
        raise InvalidRequest(str(exc)) from None
    sources = _sources(req.inputs, s)
    wanted = req.outputs or {MASK: req.binary_default}
    unknown = set(wanted) - {MASK, PROBABILITIES}
    if unknown:
        raise InvalidRequest(
            f"unknown output(s) {sorted(unknown)}; this model has {MASK} and {PROBABILITIES}"
        )
    prepared = await preprocess(state, sources)
    if len({p.size for p in prepared}) > 1:
        raise InvalidRequest(
            "the images of one request must have the same size (outputs are [N, H, W] tensors)"
        )
    results, timing = await segment(state, request, prepared, deadline, probabilities=PROBABILITIES in wanted)
    segmented = await postprocess(state, results, prepared, png=False)
    outputs = []
    if MASK in wanted:
        outputs.append((MASK, np.stack([r.mask for r in segmented]), wanted[MASK]))
    if PROBABILITIES in wanted:
        probs = np.stack([r.probabilities for r in segmented]).astype(np.float32)
        outputs.append((PROBABILITIES, probs, wanted[PROBABILITIES]))
    payload, header_length = encode_infer_response(seg.name, seg.version, req.id, outputs)
    headers = {
        "X-Queue-Time-Ms": f"{timing.queue_ms:.1f}",
        "X-Inference-Time-Ms": f"{timing.inference_ms:.1f}",
    }
    if header_length is None:
        return Response(payload, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(header_length)
    return Response(payload, media_type="application/octet-stream", headers=headers)


def _sources(inputs, s):
    if len(inputs) != 1:
        raise InvalidRequest(f"send exactly one input ({IMAGE} or {IMAGE_BYTES}), got {len(inputs)}")
    tensor = inputs[0]
    if tensor.name == IMAGE:
        if tensor.datatype != "UINT8":
            raise InvalidRequest(f"input {IMAGE} must be UINT8, got {tensor.datatype}")
        if len(tensor.shape) != 4 or tensor.shape[3] != 3:
            raise InvalidRequest(f"input {IMAGE} must have shape [N, H, W, 3], got {list(tensor.shape)}")
        n, h, w, _ = tensor.shape
        if h * w > s.max_image_pixels:
            raise PayloadTooLarge(f"{w}x{h} pixels is over the limit of {s.max_image_pixels} pixels")
        if min(h, w) < s.min_image_side:
            raise InvalidRequest(
                f"{w}x{h} is too small; the smallest accepted is {s.min_image_side}x{s.min_image_side}"
            )
        items = [(f"{IMAGE}[{i}]", np.array(tensor.value[i])) for i in range(n)]
    elif tensor.name == IMAGE_BYTES:
        if tensor.datatype != "BYTES":
            raise InvalidRequest(f"input {IMAGE_BYTES} must be BYTES, got {tensor.datatype}")
        if len(tensor.shape) != 1:
            raise InvalidRequest(f"input {IMAGE_BYTES} must have shape [N], got {list(tensor.shape)}")
        items = [(f"{IMAGE_BYTES}[{i}]", blob) for i, blob in enumerate(tensor.value)]
    else:
        raise InvalidRequest(f"unknown input '{tensor.name}'; this model takes {IMAGE} or {IMAGE_BYTES}")
    if not items:
        raise NoImage("the input holds no image (N = 0)")
    if len(items) > s.max_images_per_request:
        raise PayloadTooLarge(f"{len(items)} images; at most {s.max_images_per_request} per request")
    return items
