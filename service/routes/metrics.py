"""Prometheus exposition (never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import State

router = APIRouter(tags=["metrics"])


@router.get("/metrics", name="metrics", response_class=Response)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
