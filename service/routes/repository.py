"""The Open Inference Protocol's model-repository extension, as Triton has it:
``POST /v2/repository/index``, ``POST /v2/repository/models/{name}/load`` (body
``{"parameters": {"path": "<file in MODEL_REPOSITORY>"}}``, optional when the
repository holds one artifact of that name) and ``.../unload``. Behind the API key;
403 while ``MODEL_REPOSITORY`` is unset. The work is :mod:`service.repository`'s."""

from __future__ import annotations

import json
from typing import Any, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..deps import Authorized, State
from ..errors import Conflict, Forbidden, InvalidRequest, Unauthorized, responses

router = APIRouter(prefix="/v2/repository", tags=["v2 repository"])

_ERRORS = responses(InvalidRequest, Unauthorized, Forbidden, Conflict)
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


async def _json(request: Request) -> dict:
    body = await request.body()
    if not body.strip():
        return {}
    try:
        doc: Any = json.loads(body)
    except ValueError as exc:
        raise InvalidRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("the body must be a JSON object")
    return doc


def _path_parameter(doc: dict) -> Optional[str]:
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidRequest("'parameters' must be an object")
    path = parameters.get("path")
    if path is not None and not isinstance(path, str):
        raise InvalidRequest("parameters.path must be a string: a file in the model repository")
    return path


@router.post("/index", name="v2_repository", dependencies=[Authorized], responses=_ERRORS)
async def index(request: Request, state: State) -> JSONResponse:
    """Every chanseg model file in the repository, with its name, version and state."""
    doc = await _json(request)
    rows = state.repository.index()
    if doc.get("ready") is True:
        rows = [row for row in rows if row["state"] == "READY"]
    return JSONResponse(rows)


@router.post(
    "/models/{name}/load",
    name="v2_repository",
    dependencies=[Authorized],
    responses=_ERRORS,
    openapi_extra=_BODY,
)
async def load(request: Request, state: State, name: str) -> JSONResponse:
    """Load a version of ``name`` beside the one serving, warm it up and swap it in."""
    path = state.repository.find(name, _path_parameter(await _json(request)))
    loaded = await state.repository.load(path)
    return JSONResponse({"name": loaded.name, "version": loaded.version, **state.repository.last_swap})


@router.post("/models/{name}/unload", name="v2_repository", dependencies=[Authorized], responses=_ERRORS)
async def unload(request: Request, state: State, name: str) -> JSONResponse:
    """Stop serving ``name`` (requests in flight finish); not ready until a load."""
    await _json(request)
    await state.repository.unload(name)
    return JSONResponse({})
