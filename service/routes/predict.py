"""``POST /predict``: images in (multipart ``file`` parts or a raw ``image/*`` body),
masks out (JSON with base64 PNGs, or one PNG).

Two ways in, one handler (:func:`handle`): the FastAPI route (the OpenAPI schema,
and any request whose query FastAPI must validate), and :class:`Direct`, which
answers a ``POST /predict`` whose query is plain (``format`` one of its values,
``confidence`` a boolean, nothing repeated) without FastAPI's routing and
dependency solving: measured at c16 on 256x256 PNGs, the event loop spent
~40% of its time per request there (``docs/performance.md``, "Host work per image").
It checks the same three things the route's dependencies do, in the same order
(the API key, readiness, room in the queue), and answers errors as the
exception handlers do.
"""

from __future__ import annotations

import base64
import re
import urllib.parse
from typing import Dict, List, Literal, Optional, Sequence, Tuple

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from ..context import RequestContext
from ..deps import Admitted, Authorized, Context, Ready, State, check_api_key, check_ready, check_room
from ..errors import (
    ApiError,
    BadImage,
    ClientGone,
    DeadlineExceeded,
    InferenceFailed,
    NoImage,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    UnsupportedMediaType,
    error_body,
    responses,
)
from ..multipart import MultipartError, TooManyFiles, read_parts
from ..pipeline import Prepared, Segmented, encode_masks, preprocess, segment
from ..responses import JSONResponse

router = APIRouter(tags=["predict"])

_ERRORS = responses(
    BadImage, Unauthorized, PayloadTooLarge, UnsupportedMediaType, NoImage, InferenceFailed, Overloaded,
    DeadlineExceeded, RequestTimeout,
)  # fmt: skip
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                        }
                    },
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_FILENAME = re.compile(r'filename="?([^";]+)"?')


async def read_images(request: Request, max_images: int) -> List[Tuple[str, bytes]]:
    """(filename, bytes) for each image in the request body."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        try:
            parts = await read_parts(
                request.headers["content-type"], request.stream(), "file", max_images, max_images + 16
            )
        except ClientDisconnect:
            raise ClientGone("client disconnected while sending its request") from None
        except TooManyFiles:
            raise PayloadTooLarge(f"more than {max_images} images in one request") from None
        except MultipartError as exc:
            raise BadImage(f"malformed multipart body: {exc}") from None
        if not parts:
            raise NoImage("no 'file' part in the multipart body")
        images = []
        for i, (_, filename, data) in enumerate(parts):
            if filename is None:
                raise NoImage(f"'file' part {i + 1} is a text field, not a file")
            images.append((filename or f"file{i + 1}", data))
        return images
    if media_type.startswith("image/"):
        try:
            body = await request.body()
        except ClientDisconnect:
            raise ClientGone("client disconnected while sending its request") from None
        if not body:
            raise NoImage("empty request body")
        match = _FILENAME.search(request.headers.get("content-disposition", ""))
        return [(match.group(1) if match else "image", body)]
    shown = media_type or "none"
    raise UnsupportedMediaType(
        f"content type {shown}: send multipart/form-data with 'file' parts, or an image/* body"
    )


def _single_png(request: Request, fmt: Optional[str]) -> Optional[str]:
    """ "png" or "confidence" when the response is that one PNG, None for JSON."""
    if fmt is not None:
        return fmt if fmt in ("png", "confidence") else None
    accept = request.headers.get("accept", "")
    return "png" if "image/png" in accept and "application/json" not in accept else None


@router.post(
    "/predict",
    name="predict",
    dependencies=[Authorized, Ready, Admitted],
    responses={200: {"content": {"image/png": {}}}, **_ERRORS},
    openapi_extra=_BODY,
)
async def predict(
    request: Request,
    state: State,
    context: Context,
    format: Optional[Literal["json", "png", "rle", "confidence"]] = Query(
        None,
        description="json (the default): per image its class fractions and pixels, connected regions and "
        "the mask as a base64 palette PNG; rle: the same with each class's mask as COCO run-length "
        "encoding (pycocotools.mask.decode reads it) instead of the PNG; png: the mask PNG itself (one "
        "image); confidence: the confidence map itself (one image), an 8-bit grey PNG of the top class's "
        "probability x 255",
    ),
    confidence: bool = Query(
        False, description="JSON: each prediction also carries confidence_png, the confidence map (base64)"
    ),
) -> Response:
    """Segment one or more images. JSON: per image its filename, size, per-class
    pixel fractions and counts, its connected regions (class, COCO bounding box
    ``[x, y, width, height]`` and pixels; the largest 100, background left out) and
    the mask as a base64 palette PNG (pixel value = class id), or with
    ``format=rle`` as ``mask_rle``: per class present, ``{"size": [H, W],
    "counts": ...}`` in COCO's compressed RLE."""
    return await handle(request, state, context, format, confidence)


async def handle(
    request: Request, state, context: RequestContext, format: Optional[str], confidence: bool
) -> Response:
    """``POST /predict`` once its caller has checked the key, readiness and room."""
    s, served = state.settings, state.segmenter  # the version this request is pinned to
    with state.tracing.span("read"):
        blobs = await read_images(request, s.max_images_per_request)
    single = _single_png(request, format)
    if single and len(blobs) != 1:
        raise BadImage(f"a PNG response holds one image; this request has {len(blobs)} images (use JSON)")
    prepared = await preprocess(state, served, context, blobs)
    blobs = None  # the encoded files are not needed any more: let their memory go
    want_confidence = single == "confidence" or (confidence and single is None)
    outputs, timing = await segment(state, served, context, prepared, confidence=want_confidence)
    mask = None if single == "confidence" else "rle" if format == "rle" else "png"
    results = await encode_masks(state, served, outputs, prepared, context, mask=mask, details=single is None)
    headers = timing.headers()
    if single:
        png = results[0].png if single == "png" else results[0].confidence_png
        return Response(png, media_type="image/png", headers=headers)
    classes = served.config.class_names
    return JSONResponse(
        {
            "model": {"name": served.name, "version": served.version},
            "request_id": context.request_id,
            "predictions": [_prediction(image, result, classes) for image, result in zip(prepared, results)],
        },
        headers=headers,
    )


def _prediction(image: Prepared, result: Segmented, classes: Sequence[str]) -> dict:
    out = {
        "filename": image.name,
        "width": image.size[1],
        "height": image.size[0],
        "class_fractions": dict(zip(classes, result.fractions)),
        "class_pixels": dict(zip(classes, result.counts)),
        "regions": result.regions,
        "region_count": result.region_count,
    }
    if result.rle is not None:
        out["mask_rle"] = result.rle
    else:
        out["mask_png"] = _b64(result.png)
    if result.confidence_png is not None:
        out["confidence_png"] = _b64(result.confidence_png)
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_FORMATS = frozenset(("json", "png", "rle", "confidence"))
# What pydantic reads as a boolean (any case); anything else goes to the route, which answers 422.
_BOOLEANS = {
    **dict.fromkeys(("1", "on", "t", "true", "y", "yes"), True),
    **dict.fromkeys(("0", "off", "f", "false", "n", "no"), False),
}


def plain_query(query_string: bytes) -> Optional[Dict[str, object]]:
    """``format`` and ``confidence`` from a query FastAPI would accept as it is, else None
    (a value it would refuse, or a parameter given twice: the route decides those)."""
    out: Dict[str, object] = {"format": None, "confidence": False}
    seen = set()
    for key, value in urllib.parse.parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key in seen:
            return None
        seen.add(key)
        if key == "format":
            if value not in _FORMATS:
                return None
            out["format"] = value
        elif key == "confidence":
            flag = _BOOLEANS.get(value.lower())
            if flag is None:
                return None
            out["confidence"] = flag
    return out


class Direct:
    """ASGI: ``POST /predict`` with a plain query straight to :func:`handle`; every other
    request to ``app`` (the FastAPI stack). Sits inside the request middleware, which
    made the request's context."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.route = next(r for r in router.routes if getattr(r, "name", None) == "predict")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = None
        if scope["type"] == "http" and scope["method"] == "POST" and _route_path(scope) == "/predict":
            query = plain_query(scope.get("query_string", b""))
        if query is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # for the metrics' and access log's endpoint, as the router sets it
        request = Request(scope, receive, send)
        state = scope["app"].state.chanseg
        try:
            check_api_key(state, request.headers)
            check_ready(state)
            check_room(state)
            response = await handle(request, state, scope["chanseg"], **query)
        except ApiError as exc:  # as errors.register_handlers answers it
            response = JSONResponse(
                error_body("/predict", exc.detail), status_code=exc.status, headers=exc.headers
            )
        await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path as the router matches it: without the ``root_path`` the app is mounted at."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
