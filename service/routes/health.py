"""Liveness and readiness probes (never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import State

router = APIRouter(tags=["health"])


@router.get("/healthz", name="healthz")
async def healthz() -> dict:
    """200 while the process serves."""
    return {"status": "ok"}


@router.get("/readyz", name="readyz", responses={503: {"description": "not ready, or draining"}})
async def readyz(state: State) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 before that and while draining."""
    if state.ready and not state.draining:
        return JSONResponse({"status": "ready"})
    status = "draining" if state.draining else "starting"
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "5"})
