"""The Open Inference Protocol's HTTP endpoints (KServe v2 / Triton REST): thin. Each
decodes its request with :mod:`service.v2_codec` (JSON, or JSON + the binary tensor data
extension), calls the data plane (:mod:`service.dataplane`, which the gRPC servicer calls
too; the model's inputs and outputs are described there) and encodes its answer.

Nothing heavy runs on the event loop: the body is parsed and the response encoded on
the I/O pool; a JSON body over ``MAX_JSON_BYTES`` is refused before it is read, and its
parsed form is reserved in the memory budget. Responses are streamed from one buffer in
1 MiB pieces. Requests share the batcher, limits, deadlines, memory budget, API key and
metrics with ``/predict``.
"""

from __future__ import annotations

import zlib
from typing import AsyncIterator, Optional

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from .. import dataplane
from ..budget import MIB
from ..deps import Admitted, Authorized, Context, Ready, State
from ..errors import (
    BadImage,
    ClientGone,
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequest,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    UnsupportedMediaType,
    responses,
)
from ..pipeline import pool_call, reserve_output
from ..responses import JSONResponse
from ..settings import JSON_PARSE_COST
from ..v2_codec import V2Error, V2TooLarge, decode_request, encode_response, request_schema

router = APIRouter(prefix="/v2", tags=["v2"])

_INFER_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema()}}}
}
_CHUNK = MIB
_NOT_READY = responses(NotReady)
# Each route below answers at two paths (with and without a version).
_METADATA_ROUTE = dict(
    name="v2_model", dependencies=[Authorized], responses=responses(Unauthorized, NotFound)
)
_READY_ROUTE = dict(name="v2_model", responses=responses(NotFound, NotReady))
_INFER_ROUTE = dict(
    name="v2_infer",
    dependencies=[Authorized, Ready, Admitted],
    openapi_extra=_INFER_BODY,
    responses=responses(
        InvalidRequest,
        BadImage,
        PayloadTooLarge,
        InferenceFailed,
        Overloaded,
        DeadlineExceeded,
        Unauthorized,
        NotFound,
        RequestTimeout,
        UnsupportedMediaType,
    ),  # fmt: skip
)


@router.get("", name="v2_server")
@router.get("/", name="v2_server", include_in_schema=False)  # answered, not redirected (307)
async def server_metadata(state: State) -> dict:
    return dataplane.server_metadata(state)


_SHARED_MEMORY_ROUTE = dict(
    name="v2_shared_memory",
    methods=["GET", "POST"],
    dependencies=[Authorized],  # as over gRPC, where every call but the server's health takes the key
    responses=responses(InvalidRequest, Unauthorized),
    include_in_schema=False,
)


@router.api_route("/systemsharedmemory/{rest:path}", **_SHARED_MEMORY_ROUTE)
@router.api_route("/cudasharedmemory/{rest:path}", **_SHARED_MEMORY_ROUTE)
async def shared_memory(request: Request, rest: str) -> None:
    """Triton's shared-memory extensions: refused, by name (tritonclient's
    ``register_system_shared_memory`` gets a 400 that says so, never a silent success)."""
    kind = "CUDA" if "/cudasharedmemory/" in request.url.path else "system"
    raise InvalidRequest(dataplane.SHARED_MEMORY_REFUSED.format(kind=kind))


@router.get(
    "/health/live",
    name="v2_health",
    responses={503: {"description": "the device failed, or the inference thread is stuck"}},
)
async def live(state: State) -> JSONResponse:
    ok = dataplane.live(state)
    return JSONResponse({"live": ok}, status_code=200 if ok else 503)


@router.get("/health/ready", name="v2_health", responses=_NOT_READY)
async def ready(state: State) -> JSONResponse:
    ok = dataplane.ready(state)
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/stats", **_METADATA_ROUTE)  # before /models/{name}: "stats" is no model's name
async def all_statistics(state: State) -> dict:
    """Triton's statistics extension for every model this server served."""
    return dataplane.model_statistics(state, None, None)


@router.get("/models/{name}", **_METADATA_ROUTE)
@router.get("/models/{name}/versions/{version}", **_METADATA_ROUTE)
async def model_metadata(state: State, name: str, version: Optional[str] = None) -> dict:
    return dataplane.model_metadata(state, name, version)


@router.get("/models/{name}/config", **_METADATA_ROUTE)
@router.get("/models/{name}/versions/{version}/config", **_METADATA_ROUTE)
async def model_config(state: State, name: str, version: Optional[str] = None) -> dict:
    """Triton's model configuration extension (what perf_analyzer reads first)."""
    return dataplane.model_config(state, name, version)


@router.get("/models/{name}/stats", **_METADATA_ROUTE)
@router.get("/models/{name}/versions/{version}/stats", **_METADATA_ROUTE)
async def model_statistics(state: State, name: Optional[str] = None, version: Optional[str] = None) -> dict:
    """Triton's statistics extension: counts and cumulative times per model version."""
    return dataplane.model_statistics(state, name, version)


@router.get("/models/{name}/ready", **_READY_ROUTE)
@router.get("/models/{name}/versions/{version}/ready", **_READY_ROUTE)
async def model_ready(state: State, name: str, version: Optional[str] = None) -> JSONResponse:
    seg = dataplane.served_model(state, name, version)
    ok = dataplane.ready(state)
    return JSONResponse({"name": seg.name, "ready": ok}, status_code=200 if ok else 503)


@router.post("/models/{name}/infer", **_INFER_ROUTE)
@router.post("/models/{name}/versions/{version}/infer", **_INFER_ROUTE)
async def infer(
    request: Request, state: State, context: Context, name: str, version: Optional[str] = None
) -> Response:
    seg = dataplane.served_model(state, name, version)
    s = state.settings
    header_length = request.headers.get("inference-header-content-length")
    declared = request.headers.get("content-length", "")
    if header_length is None and declared.isdigit() and int(declared) > s.max_json_bytes:
        raise _json_too_large(int(declared), s.max_json_bytes)
    try:
        with state.tracing.span("read"):
            body = await request.body()  # size-limited by the middleware; no Content-Type needed
    except ClientDisconnect:
        raise ClientGone("client disconnected while sending its request") from None
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):  # tritonclient's request_compression_algorithm
        if encoding not in _DECODERS:
            raise UnsupportedMediaType(
                f"Content-Encoding {encoding[:50]!r}: chanseg reads gzip, deflate or identity bodies"
            )
        # The decoded body is held like the work of decoding an image, within the budget.
        lease = await reserve_output(state, context, s.max_upload_bytes, "decompressing the request")
        body = await pool_call(state, _decompressed, body, encoding, s.max_upload_bytes)
        lease.shrink(len(body))
    json_bytes = len(body) if header_length is None else min(len(body), max(0, _int(header_length)))
    if json_bytes > s.max_json_bytes:
        raise _json_too_large(json_bytes, s.max_json_bytes)

    # Parse, check, materialise: the parsed JSON's memory stays reserved until the
    # images are prepared (from then on their data lives in input-size tensors).
    parse_lease = await reserve_output(
        state, context, JSON_PARSE_COST * json_bytes, "parsing the request's JSON"
    )
    try:
        req = await pool_call(state, decode_request, body, header_length)
    except V2TooLarge as exc:
        raise PayloadTooLarge(str(exc)) from None
    except V2Error as exc:
        raise InvalidRequest(str(exc)) from None
    del body
    outputs, timing = await dataplane.infer(state, seg, context, req, parse_lease)
    reply_id = req.id
    del req
    with state.tracing.span("encode"):
        payload, header_length_out = await pool_call(
            state, encode_response, seg.name, seg.version, reply_id, outputs
        )
    headers = {**timing.headers(), "Content-Length": str(len(payload))}
    media_type = "application/json"
    if header_length_out is not None:
        headers["Inference-Header-Content-Length"] = str(header_length_out)
        media_type = "application/octet-stream"
    return StreamingResponse(_chunks(payload), media_type=media_type, headers=headers)


_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decoded, at most ``limit`` bytes of it (more is a compression bomb: 413).
    ``deflate`` is zlib's format, or raw deflate as some clients send it. zlib lets the
    interpreter lock go while it inflates."""
    try:
        return _inflated(zlib.decompressobj(_DECODERS[encoding]), body, encoding, limit)
    except zlib.error as exc:
        if encoding == "deflate":
            try:
                return _inflated(zlib.decompressobj(-zlib.MAX_WBITS), body, encoding, limit)
            except zlib.error:
                pass
        raise InvalidRequest(f"the body is not valid {encoding} ({exc})") from None


def _inflated(inflater, body: bytes, encoding: str, limit: int) -> bytes:
    out = inflater.decompress(body, limit + 1)
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(
            f"the {encoding} body inflates to over {limit} bytes, the limit of MAX_UPLOAD_BYTES"
        )
    if not inflater.eof:
        raise InvalidRequest(f"the {encoding} body is cut short")
    return out


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidRequest("Inference-Header-Content-Length must be an integer") from None


def _json_too_large(nbytes: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"JSON of {nbytes} bytes is over the limit of {limit} bytes for JSON (MAX_JSON_BYTES): send the "
        "tensor in binary (the binary tensor data extension), or encoded files as IMAGE_BYTES"
    )


async def _chunks(payload) -> AsyncIterator[memoryview]:
    # Async: Starlette iterates a plain generator on AnyIO's worker threads, a thread
    # hop per chunk, and those threads come and go with the traffic.
    view = memoryview(payload)
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]
