"""Liveness and readiness probes (never behind the API key).

Liveness sees the inference thread: while one batch has been running far
longer than warm-up measured (``WATCHDOG_S``), ``/healthz`` answers 503, so
an orchestrator restarts a pod whose device or kernel hung instead of
leaving it "healthy" while every request times out.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import State

router = APIRouter(tags=["health"])

_STUCK = {503: {"description": "the inference thread is stuck (a batch far past its measured time)"}}


@router.get("/healthz", name="healthz", responses=_STUCK)
async def healthz(state: State) -> JSONResponse:
    """200 while the process serves; 503 while a batch is stuck."""
    stuck = state.stuck()
    if stuck:
        return JSONResponse({"status": "stuck", "detail": stuck}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz", name="readyz", responses={503: {"description": "not ready, draining or stuck"}})
async def readyz(state: State) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 before that, while draining, and while stuck."""
    stuck = state.stuck()
    if state.ready and not state.draining and not stuck:
        return JSONResponse({"status": "ready"})
    status = "stuck" if stuck else "draining" if state.draining else "starting"
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "5"})
