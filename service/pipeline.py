"""The stages every inference endpoint shares: preprocess, batch, postprocess.

``preprocess`` decodes and prepares images on the I/O pool, ``segment`` queues
them on the batcher and waits for the labels under the request's deadline
(dropping them if the client goes away), ``postprocess`` turns labels into
masks, class fractions and PNGs on the I/O pool. Per-image times go to the
``chanseg_preprocess/postprocess_duration_seconds`` histograms.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from fastapi import Request

from model.visualize import mask_png_bytes

from .batching import BatchFailed, DeadlineExpired, DynamicBatcher, QueueFull
from .errors import ClientGone, DeadlineExceeded, InferenceFailed, NotReady, Overloaded
from .imaging import decode_image

__all__ = ["InferItem", "Prepared", "Segmented", "preprocess", "segment", "postprocess", "deadline_of"]


@dataclass
class Prepared:
    size: Tuple[int, int]  # (height, width) of the image as decoded
    tensor: torch.Tensor  # what the segmenter's logits() takes


@dataclass
class InferItem:
    """What the batcher carries per image."""

    tensor: torch.Tensor
    want_probabilities: bool = False


@dataclass
class Segmented:
    mask: np.ndarray  # (H, W) uint8 at the image's size
    fractions: List[float]  # per class, summing to 1
    png: Optional[bytes]
    probabilities: Optional[np.ndarray] = None  # (C, H, W) float32, when asked for


@dataclass
class Timing:
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_sizes: Tuple[int, ...] = ()


def deadline_of(request: Request, timeout_s: float) -> float:
    started = request.scope.get("chanseg", {}).get("started", time.monotonic())
    return started + timeout_s


def _pool_call(state, fn, *args):
    return asyncio.get_running_loop().run_in_executor(state.pool, fn, *args)


async def preprocess(state, sources: Sequence[Tuple[str, Union[bytes, np.ndarray]]]) -> List[Prepared]:
    """Decode (bytes) and prepare each image on the I/O pool; the first bad image raises."""
    s, segmenter, hist = state.settings, state.segmenter, state.metrics.preprocess

    def one(name: str, source) -> Prepared:
        t = time.perf_counter()
        rgb = (
            source
            if isinstance(source, np.ndarray)
            else decode_image(source, s.max_image_pixels, s.min_image_side, name)
        )
        prepared = Prepared((int(rgb.shape[0]), int(rgb.shape[1])), segmenter.prepare(rgb))
        hist.observe(time.perf_counter() - t)
        return prepared

    if state.batcher is None:
        announce = contextlib.nullcontext()
    else:
        try:  # room in the queue first: an overloaded server refuses before decoding
            announce = state.batcher.incoming(len(sources))
        except QueueFull as exc:
            raise Overloaded(f"server busy: {exc}; retry later", retry_after_s=1) from None
    with announce:  # a forming batch waits for these rather than closing early
        return list(await asyncio.gather(*(_pool_call(state, one, name, src) for name, src in sources)))


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def segment(
    state, request: Request, images: Sequence[Prepared], deadline: float, probabilities: bool = False
) -> Tuple[List, Timing]:
    """Queue images on the batcher; per image (labels, logits or None), or the right ApiError."""
    batcher: DynamicBatcher = state.batcher
    if batcher is None:  # requests that got in before a drain still finish: no draining check here
        raise NotReady("the model is not ready yet", retry_after_s=5)
    try:
        jobs = batcher.submit([InferItem(im.tensor, probabilities) for im in images], deadline)
    except QueueFull as exc:
        raise Overloaded(f"server busy: {exc}; retry later", retry_after_s=1) from None
    gathered = asyncio.gather(*(job.future for job in jobs))
    watcher = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {gathered, watcher},
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        watcher.cancel()
    if gathered not in done:
        batcher.cancel(jobs)
        if watcher in done:
            raise ClientGone("client disconnected")
        raise DeadlineExceeded("request deadline passed before its result (REQUEST_TIMEOUT_S)")
    try:
        labels = gathered.result()
    except DeadlineExpired:
        batcher.cancel(jobs)
        raise DeadlineExceeded("request deadline passed while queued (REQUEST_TIMEOUT_S)") from None
    except BatchFailed as exc:
        batcher.cancel(jobs)
        raise InferenceFailed(f"inference failed for the batch holding this request ({exc})") from None
    state.metrics.images.inc(len(jobs))
    timing = Timing(
        queue_ms=max(j.queue_s for j in jobs) * 1000,
        inference_ms=max(j.inference_s for j in jobs) * 1000,
        batch_sizes=tuple(j.batch_size for j in jobs),
    )
    request.scope.setdefault("chanseg", {}).update(
        images=len(jobs), queue_ms=timing.queue_ms, inference_ms=timing.inference_ms
    )
    return labels, timing


async def postprocess(
    state, results: Sequence, images: Sequence[Prepared], png: bool = True
) -> List[Segmented]:
    """(labels, logits) at the input size -> masks (+ PNG, + probabilities) at each
    image's size, on the I/O pool."""
    segmenter, hist = state.segmenter, state.metrics.postprocess
    num_classes = segmenter.config.num_classes

    def one(result, size) -> Segmented:
        t = time.perf_counter()
        labels, logits = result
        mask = segmenter.restore(labels, size)
        counts = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
        encoded = mask_png_bytes(mask, num_classes) if png else None
        probs = segmenter.probabilities(logits, size).numpy() if logits is not None else None
        hist.observe(time.perf_counter() - t)
        return Segmented(mask, (counts / max(1, mask.size)).tolist(), encoded, probs)

    return list(await asyncio.gather(*(_pool_call(state, one, r, im.size) for r, im in zip(results, images))))
