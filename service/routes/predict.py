"""``POST /predict``: images in (multipart ``file`` parts or a raw ``image/*`` body),
masks out (JSON with base64 PNGs, or one PNG)."""

from __future__ import annotations

import base64
import re
from typing import List, Literal, Optional, Sequence, Tuple

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..deps import Admitted, Authorized, Context, Ready, State
from ..errors import (
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
    responses,
)
from ..pipeline import Prepared, Segmented, encode_masks, preprocess, segment

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
            form = await request.form(max_files=max_images, max_fields=max_images + 16)
        except ClientDisconnect:
            raise ClientGone("client disconnected while sending its request") from None
        except StarletteHTTPException as exc:
            if "Too many files" in str(exc.detail):
                raise PayloadTooLarge(f"more than {max_images} images in one request") from None
            raise BadImage(f"malformed multipart body: {exc.detail}") from None
        parts = form.getlist("file")
        if not parts:
            raise NoImage("no 'file' part in the multipart body")
        images = []
        for i, part in enumerate(parts):
            if isinstance(part, str):
                raise NoImage(f"'file' part {i + 1} is a text field, not a file")
            images.append((part.filename or f"file{i + 1}", await part.read()))
            await part.close()
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
