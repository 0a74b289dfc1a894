"""Exception types, each with its HTTP status and its gRPC code, and all HTTP handlers in
one place (the gRPC servicer answers ``grpc_code`` with ``detail``).

Every error body is JSON ``{"detail": "..."}`` (the v2 protocol's routes use
``{"error": "..."}``). The catch-all for unexpected exceptions is in
``RequestMiddleware`` (a handler for ``Exception`` would make Starlette re-raise
to the server, logging every failure twice): a generic 500 without internals,
logged once with the request id.
"""

from __future__ import annotations

from typing import Dict, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .responses import JSONResponse

__all__ = [
    "ApiError",
    "BadImage",
    "Unauthorized",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "NoImage",
    "Overloaded",
    "NotReady",
    "DeadlineExceeded",
    "InferenceFailed",
    "Forbidden",
    "Conflict",
    "DeviceLost",
    "device_lost",
    "ClientGone",
    "RequestTimeout",
    "InvalidRequest",
    "NotFound",
    "VersionNotLoaded",
    "NotImplementedCall",
    "register_handlers",
    "responses",
]


MAX_DETAIL = 1000  # characters of a message: it may quote what a client sent (a name, a path)


class ApiError(Exception):
    """Base class: ``status`` (HTTP), ``grpc_code`` (a ``grpc.StatusCode`` name) and a
    message safe to show to clients, at most :data:`MAX_DETAIL` characters (a gRPC
    client takes 8 KiB of trailers by default)."""

    status: int = 500
    grpc_code: str = "INTERNAL"

    def __init__(self, detail: str, headers: Optional[Dict[str, str]] = None) -> None:
        if len(detail) > MAX_DETAIL:
            detail = detail[: MAX_DETAIL - 3] + "..."
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadImage(ApiError):
    """400: undecodable, corrupt or unusable image."""

    status, grpc_code = 400, "INVALID_ARGUMENT"


class Unauthorized(ApiError):
    """401: missing or wrong API key."""

    status, grpc_code = 401, "UNAUTHENTICATED"

    def __init__(self, detail: str = "missing or invalid API key") -> None:
        super().__init__(detail, {"WWW-Authenticate": "Bearer"})


class PayloadTooLarge(ApiError):
    """413: body, pixel count or number of images over the limit."""

    status, grpc_code = 413, "RESOURCE_EXHAUSTED"


class UnsupportedMediaType(ApiError):
    """415: a content type the endpoint does not take."""

    status, grpc_code = 415, "INVALID_ARGUMENT"


class NoImage(ApiError):
    """422: the request holds no image."""

    status, grpc_code = 422, "INVALID_ARGUMENT"


class Overloaded(ApiError):
    """503 + Retry-After: the queue is full, or the server is draining or not ready."""

    status, grpc_code = 503, "UNAVAILABLE"

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail, {"Retry-After": str(retry_after_s)})


class NotReady(Overloaded):
    """503: the model is not loaded yet, or the server is shutting down."""


class DeadlineExceeded(ApiError):
    """504: the request's deadline passed before its result."""

    status, grpc_code = 504, "DEADLINE_EXCEEDED"


class InferenceFailed(ApiError):
    """500: the batch this request was part of failed (logged once per batch, with the detail)."""

    status, grpc_code = 500, "INTERNAL"


class DeviceLost(RuntimeError):
    """The device failed for good (an illegal memory access, a device-side assert):
    nothing more runs on it in this process. Its requests get 500s; the server stops."""


# What torch says after an error that leaves a CUDA context unusable: every later
# call on it fails too. Out-of-memory is not one of them (the batch is split instead).
_FATAL_DEVICE_ERRORS = (
    "cuda error",
    "cudaerror",
    "cublas_status_execution_failed",
    "cublas_status_internal_error",
    "cudnn_status_execution_failed",
    "cudnn_status_internal_error",
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "uncorrectable ecc error",
)


def device_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the device is unusable for the rest of the process."""
    if isinstance(exc, DeviceLost):
        return True
    text = str(exc).lower()
    if "out of memory" in text:
        return False
    return any(marker in text for marker in _FATAL_DEVICE_ERRORS)


class RequestTimeout(ApiError):
    """408: the request's headers and body did not arrive within READ_TIMEOUT_S."""

    status, grpc_code = 408, "DEADLINE_EXCEEDED"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, {"Connection": "close"})


class ClientGone(ApiError):
    """499 (nginx's code): the client disconnected before its result; nothing is sent."""

    status, grpc_code = 499, "CANCELLED"


class InvalidRequest(ApiError):
    """400: a request the protocol does not allow (wrong datatype, shape, name, byte count)."""

    status, grpc_code = 400, "INVALID_ARGUMENT"


class NotFound(ApiError):
    """404: unknown model name or version."""

    status, grpc_code = 404, "NOT_FOUND"


class VersionNotLoaded(NotFound):
    """404: a version of the model that is in the model repository but not the one serving
    (gRPC's ``ModelReady`` answers ``ready: false`` for it, as Triton does)."""


class Forbidden(ApiError):
    """403: the model repository is off (MODEL_REPOSITORY unset), or a web page of another origin."""

    status, grpc_code = 403, "PERMISSION_DENIED"


class Conflict(ApiError):
    """409: another model load is in progress; retry when it is done."""

    status, grpc_code = 409, "ABORTED"


class NotImplementedCall(ApiError):
    """501: a call of the protocol that chanseg does not implement."""

    status, grpc_code = 501, "UNIMPLEMENTED"


def responses(*errors: type) -> Dict[int, dict]:
    """OpenAPI ``responses`` for a route that raises ``errors``: each status with
    its classes' docstrings, so the schema cannot drift from the exceptions."""
    out: Dict[int, dict] = {}
    for error in errors:
        text = (error.__doc__ or "").strip().splitlines()[0].split(": ", 1)[-1].rstrip(".")
        entry = out.setdefault(error.status, {"description": text})
        if text not in entry["description"]:
            entry["description"] += f"; {text}"
    return out


def error_body(path: str, detail: str) -> dict:
    """``{"detail": ...}``, or ``{"error": ...}`` on the v2 protocol's paths."""
    return {"error" if path.startswith("/v2") else "detail": detail}


def _body(request: Request, detail: str) -> dict:
    return error_body(request.url.path, detail)


def register_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_body(request, exc.detail), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        status = 400 if request.url.path.startswith("/v2") else 422
        return JSONResponse(_body(request, errors or "invalid request"), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_body(request, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)
