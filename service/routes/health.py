"""Liveness and readiness probes (never behind the API key).

Liveness sees the inference thread and the device: while one batch has been
running far longer than warm-up measured (``WATCHDOG_S``), or once the device
failed for good (a CUDA illegal address or device-side assert: the server
then stops itself), ``/healthz`` answers 503, so an orchestrator restarts a
pod whose device or kernel hung instead of leaving it "healthy" while every
request fails.
"""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import State
from ..responses import JSONResponse

router = APIRouter(tags=["health"])

_UNHEALTHY = {
    503: {"description": "the device failed (the server is stopping), or the inference thread is stuck"}
}


@router.get("/healthz", name="healthz", responses=_UNHEALTHY)
async def healthz(state: State) -> JSONResponse:
    """200 while the process serves; 503 after a device failure and while a batch is stuck."""
    unhealthy = state.unhealthy()
    if unhealthy:
        status, detail = unhealthy
        return JSONResponse({"status": status, "detail": detail}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz", name="readyz", responses={503: {"description": "not ready, draining, stuck or device lost"}}
)
async def readyz(state: State) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 before that, while draining, when stuck or the device failed."""
    if state.serving:
        return JSONResponse({"status": "ready"})
    unhealthy = state.unhealthy()
    status = unhealthy[0] if unhealthy else "draining" if state.draining else "starting"
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "5"})
