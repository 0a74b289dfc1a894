"""``GET /v1/model``: what is being served and how it is batched."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from fastapi import APIRouter
from pydantic import BaseModel

from model.visualize import palette

from ..deps import Authorized, Ready, State
from ..errors import NotReady, Unauthorized, responses

router = APIRouter(tags=["model"])


class Batching(BaseModel):
    max_batch_size: int
    max_batch_size_setting: str
    max_batch_size_source: str  # "measured" at this start, "reused" from the cache, or "setting"
    measured_at: Optional[str] = None  # when the measurement was made (ISO 8601)
    # Measured at this start: False when AUTO_BATCH_BUDGET_S ran out while larger batches were
    # still faster (the choice is for now: not kept, measured again at the next start).
    measurement_complete: Optional[bool] = None
    max_batch_delay_ms: float
    max_queue: int
    measured_images_per_s: Optional[Dict[int, float]] = None


class ModelMetadata(BaseModel):
    name: str
    version: str
    classes: List[str]
    palette: List[Tuple[int, int, int]]  # per class the RGB colour its masks and overlays use
    input_size: Tuple[int, int]
    mean: List[float]
    std: List[float]
    device: str
    precision: str
    format: str  # "torchscript", or "package" (a compiled package)
    batching: Batching


@router.get(
    "/v1/model",
    name="model",
    response_model=ModelMetadata,
    dependencies=[Authorized, Ready],
    responses=responses(Unauthorized, NotReady),
)
async def model_metadata(state: State) -> ModelMetadata:
    seg, s = state.segmenter, state.settings
    return ModelMetadata(
        name=seg.name,
        version=seg.version,
        classes=list(seg.config.class_names),
        palette=palette(seg.config.num_classes),
        input_size=tuple(seg.config.input_size),
        mean=list(seg.config.mean),
        std=list(seg.config.std),
        device=str(seg.device),
        precision=seg.precision,
        format=seg.format,
        batching=Batching(
            max_batch_size=state.max_batch_size,
            max_batch_size_setting=str(s.max_batch_size),
            max_batch_size_source=state.batching.source,
            measured_at=state.batching.measured_at,
            measurement_complete=state.batching.complete if state.batching.source == "measured" else None,
            max_batch_delay_ms=s.max_batch_delay_ms,
            max_queue=s.max_queue,
            measured_images_per_s={b: round(v, 2) for b, v in state.batching.throughput.items()} or None,
        ),
    )
