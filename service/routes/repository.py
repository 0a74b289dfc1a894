"""The Open Inference Protocol's model-repository extension, as Triton has it:
``POST /v2/repository/index``, ``POST /v2/repository/models/{name}/load`` (body
``{"parameters": {"path": "<file in MODEL_REPOSITORY>"}}``, optional for a model in
Triton's layout, whose version policy picks, and when the repository holds one artifact
of that name; Triton's ``config`` and ``file:...`` parameters are refused) and
``.../unload``. 403 while ``MODEL_REPOSITORY`` is unset. The work is
:mod:`service.repository`'s; the gRPC calls (:mod:`service.grpc_repository`) answer alike.

The admin API, guarded against web pages and clumsy clients (``deps.check_admin``):
a browser's request from another origin is 403 (the request carries ``Origin``), the
key is ``ADMIN_API_KEY`` (``API_KEY`` when unset); a body is JSON (``application/json``,
or no ``Content-Type``, as tritonclient sends it: anything else is 415, so a page's
``text/plain`` form needs no preflight and gets nothing done), at most
:data:`MAX_BODY` bytes, parsed and the repository scanned off the event loop."""

from __future__ import annotations

import json
from typing import Any, Optional

from fastapi import APIRouter, Request

from ..deps import Admin, State
from ..errors import (
    Conflict,
    DeadlineExceeded,
    Forbidden,
    InvalidRequest,
    NotReady,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
    responses,
)
from ..pipeline import pool_call
from ..repository import load_path
from ..responses import JSONResponse

router = APIRouter(prefix="/v2/repository", tags=["v2 repository"])

MAX_BODY = 64 << 10  # a path and a few parameters
_ERRORS = responses(
    InvalidRequest, Unauthorized, Forbidden, Conflict, PayloadTooLarge, UnsupportedMediaType, NotReady
)
_BODY = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}
                    },
                }
            }
        },
    }
}


async def _json(request: Request, state) -> dict:
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind not in ("", "application/json"):
        raise UnsupportedMediaType(f"send the body as application/json, not {kind[:100]}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise PayloadTooLarge(f"a body of {declared} bytes; the repository's routes take at most {MAX_BODY}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise PayloadTooLarge(f"a body over {MAX_BODY} bytes; the repository's routes take at most that")
    if not body.strip():
        return {}
    return await pool_call(state, _parse, body)


def _parse(body: bytes) -> dict:
    try:
        doc: Any = json.loads(body)
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InvalidRequest(f"the body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("the body must be a JSON object")
    return doc


def _path_parameter(doc: dict) -> Optional[str]:
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidRequest("'parameters' must be an object")
    return load_path(parameters)


@router.post("/index", name="v2_repository", dependencies=[Admin], responses=_ERRORS)
async def index(request: Request, state: State) -> JSONResponse:
    """Every model in the repository (each version of a Triton-layout model, each chanseg
    file elsewhere), with its name, version and state."""
    doc = await _json(request, state)
    repository = state.repository
    rows = await pool_call(state, repository.index)
    if doc.get("ready") is True:
        rows = [row for row in rows if row["state"] == "READY"]
    return JSONResponse(rows)


@router.post(
    "/models/{name}/load",
    name="v2_repository",
    dependencies=[Admin],
    responses=responses(DeadlineExceeded) | _ERRORS,
    openapi_extra=_BODY,
)
async def load(request: Request, state: State, name: str) -> JSONResponse:
    """Load a version of ``name`` beside the one serving, warm it up and swap it in."""
    given = _path_parameter(await _json(request, state))
    path = await pool_call(state, state.repository.find, name, given)
    loaded = await state.repository.load(path)
    return JSONResponse({"name": loaded.name, "version": loaded.version, **state.repository.last_swap})


@router.post("/models/{name}/unload", name="v2_repository", dependencies=[Admin], responses=_ERRORS)
async def unload(request: Request, state: State, name: str) -> JSONResponse:
    """Stop serving ``name`` (requests in flight finish); not ready until a load."""
    await _json(request, state)
    await state.repository.unload(name)
    return JSONResponse({})
