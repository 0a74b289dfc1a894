"""The stages every inference endpoint shares: preprocess, batch, postprocess.

``preprocess`` reads each image's header on the I/O pool, checks the request's
pixel total, then for each image reserves the memory its decoding will take
(from the work ledger of :mod:`service.budget`, waiting its turn) and decodes
and resizes it on the I/O pool; what stays is an input-size tensor.
``segment`` queues the tensors on the batcher and waits for the labels under
the request's deadline (dropping them if the client goes away).
``encode_masks`` turns labels into mask PNGs (for JSON also class fractions and
regions), one image at a time within a reservation of its own, keeping only the
PNG. Per-image times go to the ``chanseg_preprocess/postprocess_duration_seconds``
histograms.

Each stage takes the request's :class:`~service.context.RequestContext` (its id,
deadline, how to learn the client went away): whichever protocol brought the request.
Memory that a request reserves and holds until its response is sent is held by its
context (``reserve_output``); the protocol's entry releases it at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch

from model.regions import regions
from model.rle import RLE_BYTES_PER_RUN, class_rles, column_runs
from model.visualize import grey_png_bytes, mask_png_bytes

from .batching import BatchFailed, DeadlineExpired, DynamicBatcher, QueueFull
from .budget import MIB, BudgetExceeded, Lease
from .context import RequestContext
from .errors import ClientGone, DeadlineExceeded, InferenceFailed, NotReady, Overloaded, PayloadTooLarge
from .imaging import Probed, decode_cost, prepare_probed, probe_image
from .interface import ServedModel
from .resources import release_free_memory

__all__ = [
    "InferItem",
    "Inferred",
    "Prepared",
    "Segmented",
    "Timing",
    "preprocess",
    "segment",
    "encode_masks",
    "reserve_output",
    "pool_call",
]

T = TypeVar("T")
Source = Union[bytes, np.ndarray]  # encoded image file, or (H, W, 3) uint8 pixels
# After work that took at least this much, the allocator hands freed memory back
# to the OS before the reservation is released (resources.release_free_memory).
LARGE = 32 * MIB
# An answer that is one PNG (the mask, or the confidence map) of at most this many pixels is
# encoded on the event loop: handing it to an I/O thread costs more than the work. Restoring
# and deflating a model's 256x256 mask takes 0.04-0.07 ms, a mask of noise of any shape ~0.2
# (0.6 for 65536x1, which MIN_IMAGE_SIDE=1 lets in), while the hand-off cost the I/O threads
# ~0.27 ms per image (waking one, the interpreter lock, a cold cache) and the loop as much as
# the encoding (docs/performance.md, "Host work per image"). A JSON answer's regions can take
# ~17 ms on a mask of noise: those stay on the I/O pool. The labels are bounded too: a mask
# flatter than they are reads a row of them per row it has (an imported model's may be wide).
INLINE_PNG_PIXELS = 1 << 16
# A request of one image reserves this much for its decoding before its header is read, when
# an I/O thread is free to take it at once, and is read and decoded in one job if its decoding
# costs no more (the benchmark's images cost 8.7-9.5 MiB, 8 of it the fixed allowance): one
# hand-off to the I/O pool instead of two (docs/performance.md, "The event loop's own work,
# less"). Only while a thread is idle, so that this is not held by jobs waiting in the queue.
DECODE_AHEAD = 12 * MIB


@dataclass
class Prepared:
    name: str
    size: Tuple[int, int]  # (height, width) of the image as decoded (and oriented)
    tensor: torch.Tensor  # (h, w, 3) uint8 at the model's input size


@dataclass
class InferItem:
    """What the batcher carries per image."""

    tensor: torch.Tensor
    want_probabilities: bool = False
    want_confidence: bool = False
    request_id: str = ""
    model: Optional[ServedModel] = None  # the version the request is pinned to; None: the one serving
    batch_context: Any = None  # the batch's span context, when tracing (service.tracing)


class Inferred(NamedTuple):
    """What the batch gives back per image, all on the CPU at the model's input size."""

    labels: torch.Tensor  # (h, w) uint8 class ids
    logits: Optional[torch.Tensor] = None  # (classes, h, w) float32, when asked for
    confidence: Optional[torch.Tensor] = (
        None  # (h, w) uint8: the top class's probability x 255, when asked for
    )


@dataclass
class Segmented:
    """One image's answer, at the image's own size."""

    counts: List[int] = field(default_factory=list)  # pixels per class (JSON only)
    fractions: List[float] = field(default_factory=list)  # per class, summing to 1 (JSON only)
    png: bytes = b""  # the mask as a palette PNG (empty when rle was asked for)
    rle: Optional[Dict[str, dict]] = None  # per class present, its COCO RLE (model.rle)
    regions: Optional[List[dict]] = None  # the largest connected regions (model.regions), when asked for
    region_count: int = 0  # the regions in all
    confidence_png: Optional[bytes] = None  # the top class's probability as an 8-bit grey PNG, when asked for


@dataclass
class Timing:
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_sizes: Tuple[int, ...] = ()
    model_version: str = ""

    def headers(self) -> Dict[str, str]:
        """The response headers every inference endpoint sends."""
        return {
            "X-Queue-Time-Ms": f"{self.queue_ms:.1f}",
            "X-Inference-Time-Ms": f"{self.inference_ms:.1f}",
            "X-Batch-Size": ",".join(map(str, self.batch_sizes)),
            "X-Model-Version": self.model_version,
        }


def overloaded(exc: QueueFull) -> Overloaded:
    """The batcher's QueueFull as the client sees it: 503 with Retry-After."""
    return Overloaded(f"server busy: {exc}; retry later", retry_after_s=1)


def pool_call(state, fn, *args):
    """Run ``fn`` on the I/O pool (PIL and numpy only: no torch kernels there)."""
    return state.pool.call(fn, *args)


async def _each(awaitables: Sequence[Awaitable[T]]) -> List[T]:
    """``asyncio.gather``'s results, as a list. Most requests hold one image: that one is
    awaited as it is, without the task gather makes of a coroutine and its gathering
    future (the event loop's CPU per request, ``docs/performance.md``)."""
    if len(awaitables) == 1:
        return [await awaitables[0]]
    return list(await asyncio.gather(*awaitables))


async def _reserve(state, context: RequestContext, nbytes: int, what: str) -> Lease:
    """Work-ledger memory for ``what``, waiting at most until the request's deadline."""
    try:
        return await state.work_budget.reserve(nbytes, timeout=context.remaining())
    except BudgetExceeded as exc:
        raise PayloadTooLarge(
            f"{what} needs {exc.nbytes / MIB:.0f} MiB, more than this server may use for it "
            f"({exc.capacity / MIB:.0f} MiB: 3/4 of MEMORY_BUDGET_MB); send it smaller"
        ) from None
    except asyncio.TimeoutError:
        raise Overloaded(  # as the body ledger's wait in the middleware, and the budget's promise: not now
            f"server busy: no memory free for {what} within the request's deadline (REQUEST_TIMEOUT_S); retry later"
        ) from None


async def preprocess(
    state,
    served: ServedModel,
    context: RequestContext,
    sources: Sequence[Tuple[str, Source]],
    check: Optional[Callable[[List[Tuple[int, int]]], None]] = None,
) -> List[Prepared]:
    """Decode (bytes) and prepare each image for ``served`` (the version the request is
    pinned to); the first bad image raises. ``check`` sees every image's (height, width)
    from the headers, before anything is decoded."""
    s, segmenter, hist = state.settings, served, state.metrics.preprocess
    target = tuple(segmenter.config.input_size)

    if state.batcher is None:
        announce = contextlib.nullcontext()
    else:
        try:  # room in the queue first: an overloaded server refuses before decoding
            announce = state.batcher.incoming(len(sources))
        except QueueFull as exc:
            raise overloaded(exc) from None

    def probe(name: str, source: Source) -> Union[Probed, np.ndarray]:
        if isinstance(source, np.ndarray):
            return source
        return probe_image(source, s.max_image_pixels, s.min_image_side, name, target)

    def prepare(name: str, item: Union[Probed, np.ndarray], started: float, large: bool) -> Prepared:
        if isinstance(item, np.ndarray):
            size = (int(item.shape[0]), int(item.shape[1]))
            tensor = segmenter.prepare(item)
        else:
            size = (item.height, item.width)
            tensor = torch.from_numpy(prepare_probed(item, target))
        if large:  # the full-size pixels are gone: their pages go back before the next image comes
            release_free_memory()
        hist.observe(time.perf_counter() - started)
        return Prepared(name, size, tensor)

    def cost(item: Union[Probed, np.ndarray]) -> int:
        if isinstance(item, np.ndarray):
            return decode_cost(item.shape[1], item.shape[0], "RGB", "RAW", target=target)
        return item.cost

    def checked(items: List[Union[Probed, np.ndarray]]) -> None:
        if check is not None:
            check([_size(item) for item in items])
        total = sum(_pixels(item) for item in items)
        if total > s.max_request_pixels:
            raise PayloadTooLarge(
                f"{total} pixels in {len(items)} images is over the limit of {s.max_request_pixels} "
                "pixels per request (MAX_REQUEST_PIXELS); send fewer or smaller images per request"
            )

    def probe_and_prepare(
        name: str, source: Source, started: float, room: int
    ) -> Union[Prepared, Probed, np.ndarray]:
        item = probe(name, source)
        checked([item])
        return prepare(name, item, started, False) if cost(item) <= room else item

    async def decode(name: str, item: Union[Probed, np.ndarray], started: float) -> Prepared:
        if isinstance(item, np.ndarray):
            h, w = item.shape[:2]
            what = f"{name} ({w}x{h} pixels)"
        else:
            what = f"decoding {name} ({item.width}x{item.height} {item.mode})"
        nbytes = cost(item)
        lease = await _reserve(state, context, nbytes, what)
        try:
            return await pool_call(state, prepare, name, item, started, nbytes >= LARGE)
        finally:
            lease.release()

    async def one(name: str, item: Union[Probed, np.ndarray], started: float) -> Prepared:
        with state.tracing.span("decode", **{"chanseg.image": name}):
            return await decode(name, item, started)

    state.tracing.annotate(context.request_id)
    with announce:  # a forming batch waits for these rather than closing early
        started = time.perf_counter()
        ahead = None
        if len(sources) == 1 and state.pool.idle:
            ahead = state.work_budget.try_reserve(DECODE_AHEAD)
        if ahead is not None:
            ((name, source),) = sources
            with state.tracing.span("decode", **{"chanseg.image": name}):  # its header read too
                try:
                    item = await pool_call(state, probe_and_prepare, name, source, started, ahead.nbytes)
                finally:
                    ahead.release()
                return [item if isinstance(item, Prepared) else await decode(name, item, started)]
        items = await _each([pool_call(state, probe, name, src) for name, src in sources])
        checked(items)
        return await _each([one(name, item, started) for (name, _), item in zip(sources, items)])


def _size(item: Union[Probed, np.ndarray]) -> Tuple[int, int]:
    return (
        (int(item.shape[0]), int(item.shape[1]))
        if isinstance(item, np.ndarray)
        else (item.height, item.width)
    )


def _pixels(item: Union[Probed, np.ndarray]) -> int:
    h, w = _size(item)
    return h * w


async def _first(a: asyncio.Future, b: asyncio.Future, timeout: float) -> None:
    """Wait until ``a`` or ``b`` is done, or ``timeout`` seconds have passed: what
    ``asyncio.wait(..., return_when=FIRST_COMPLETED)`` does, without the sets, the counter
    and the coroutine it makes per call (~5% of the event loop's CPU per request, measured
    with py-spy at c16: docs/performance.md). Cancelling the caller leaves both as they are."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    a.add_done_callback(wake)
    b.add_done_callback(wake)
    timer = loop.call_later(timeout, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        a.remove_done_callback(wake)
        b.remove_done_callback(wake)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def segment(
    state,
    served: ServedModel,
    context: RequestContext,
    images: Sequence[Prepared],
    probabilities: bool = False,
    confidence: bool = False,
) -> Tuple[List[Inferred], Timing]:
    """Queue images on the batcher for ``served``; per image its :class:`Inferred`, or the right ApiError."""
    batcher: DynamicBatcher = state.batcher
    if batcher is None:  # requests that got in before a drain still finish: no draining check here
        raise NotReady("the model is not ready yet", retry_after_s=5)
    rid, deadline = context.request_id, context.deadline
    try:
        jobs = batcher.submit(
            [InferItem(im.tensor, probabilities, confidence, rid, served) for im in images], deadline
        )
    except QueueFull as exc:
        raise overloaded(exc) from None
    context.model_stats = state.statistics.of(served.name, served.version)  # in the queue: it counts
    # One image (nearly every request): its job's own future, without a gathering one.
    single = len(jobs) == 1
    gathered = jobs[0].future if single else asyncio.gather(*(job.future for job in jobs))
    gone, watcher = context.gone, None
    if gone is None:  # the protocol does not tell: a task learns it from the request's messages
        gone = watcher = asyncio.create_task(context.wait_gone())
    try:
        await _first(gathered, gone, context.remaining())
        went = gone.done()
    finally:
        if watcher is not None:
            watcher.cancel()
    if not gathered.done():
        # Its jobs are skipped, not computed. Cancelling them leaves the gather with a
        # CancelledError that nobody awaits; asyncio would log it as a traceback.
        gathered.add_done_callback(_retrieve)
        batcher.cancel(jobs)
        if went:
            raise ClientGone("client disconnected")
        raise DeadlineExceeded("request deadline passed before its result (REQUEST_TIMEOUT_S)")
    try:
        labels = [gathered.result()] if single else gathered.result()
    except DeadlineExpired:
        batcher.cancel(jobs)
        raise DeadlineExceeded("request deadline passed while queued (REQUEST_TIMEOUT_S)") from None
    except BatchFailed:
        batcher.cancel(jobs)  # the detail is in the log, once per batch, with this request's id
        raise InferenceFailed(
            f"inference failed for the batch holding this request (request id {rid}); the server log has the details"
        ) from None
    state.metrics.images.inc(len(jobs))
    state.tracing.record_wait(
        min(j.enqueued for j in jobs),
        max(j.started for j in jobs),
        max(j.started + j.inference_s for j in jobs),
        [j.payload.batch_context for j in jobs],
    )
    timing = Timing(
        queue_ms=max(j.queue_s for j in jobs) * 1000,
        inference_ms=max(j.inference_s for j in jobs) * 1000,
        batch_sizes=tuple(j.batch_size for j in jobs),
        model_version=served.version,
    )
    context.images, context.queue_ms, context.inference_ms = len(jobs), timing.queue_ms, timing.inference_ms
    context.computed_at = time.monotonic()
    return labels, timing


def mask_rles(served: ServedModel, labels: torch.Tensor, size: Tuple[int, int]) -> Dict[str, dict]:
    """Per class present in the mask restored to ``size``, its COCO RLE. The mask is
    restored column by column, as COCO reads it (the labels' transpose to ``(W, H)``:
    nearest restoring works on each axis alone), so it is never transposed."""
    columns = served.restore(labels.T, (size[1], size[0]))
    return class_rles(columns, served.config.class_names, transposed=True)


def mask_rles_cost(labels: torch.Tensor, size: Tuple[int, int]) -> int:
    """Peak bytes of :func:`mask_rles`: the mask, a byte a pixel while its runs are found,
    and ``RLE_BYTES_PER_RUN`` for each run the labels allow the mask (``column_runs``):
    a mask of stripes has a run a pixel, a mask of blobs a few per column."""
    pixels = int(size[0]) * int(size[1])
    return 2 * pixels + RLE_BYTES_PER_RUN * column_runs(labels.numpy(), size) + MIB


def mask_encode_cost(size: Tuple[int, int]) -> int:
    """Peak bytes to restore and PNG-encode one full-size mask: the mask, and the
    encoder's output (a mask upsampled from the input size compresses far below that)."""
    return 2 * int(size[0]) * int(size[1]) + MIB


async def encode_masks(
    state,
    served: ServedModel,
    results: Sequence[Inferred],
    images: Sequence[Prepared],
    context: RequestContext,
    mask: Optional[str] = "png",
    details: bool = False,
) -> List[Segmented]:
    """Per image at its own size, on the I/O pool: the mask as a PNG (``mask="png"``),
    per-class COCO RLE (``"rle"``) or not at all (None); with ``details`` (JSON
    responses) its pixels per class and connected regions too; the confidence map as
    a grey PNG when the batch computed it. Each full-size mask exists only while it
    is encoded. One PNG of at most ``INLINE_PNG_PIXELS``, from labels no larger, is encoded on
    the event loop."""
    segmenter, hist = served, state.metrics.postprocess
    num_classes, names = segmenter.config.num_classes, segmenter.config.class_names

    def encode(result: Inferred, size: Tuple[int, int], large: bool) -> Segmented:
        t = time.perf_counter()
        done = Segmented()
        if details:
            counts = segmenter.class_counts(result.labels, size, num_classes)
            done.counts = counts.tolist()
            done.fractions = (counts / max(1, int(size[0]) * int(size[1]))).tolist()
            done.regions, done.region_count = regions(result.labels.numpy(), size, names)
        if mask == "rle":
            done.rle = mask_rles(segmenter, result.labels, size)
        elif mask is not None:
            full = segmenter.restore(result.labels, size)
            done.png = mask_png_bytes(full, num_classes)
            del full
        if result.confidence is not None:
            done.confidence_png = grey_png_bytes(segmenter.restore(result.confidence, size))
        if large:
            release_free_memory()
        hist.observe(time.perf_counter() - t)
        return done

    async def one(result: Inferred, image: Prepared) -> Segmented:
        # The mask and its PNG, or its RLE (by its runs); a confidence map: its own mask and PNG.
        cost = mask_rles_cost(result.labels, image.size) if mask == "rle" else mask_encode_cost(image.size)
        if result.confidence is not None and mask is not None:
            cost += mask_encode_cost(image.size)
        inline = (
            not details
            and mask != "rle"
            and max(image.size[0] * image.size[1], result.labels.numel()) <= INLINE_PNG_PIXELS
        )
        with state.tracing.span("encode", **{"chanseg.image": image.name}):
            lease = await _reserve(state, context, cost, f"the mask of {image.name}")
            try:
                if inline:
                    return encode(result, image.size, False)
                return await pool_call(state, encode, result, image.size, cost >= LARGE)
            finally:
                lease.release()

    return await _each([one(r, im) for r, im in zip(results, images)])


async def reserve_output(state, context: RequestContext, nbytes: int, what: str) -> Lease:
    """Reserve a response's memory (within the request's deadline) until it has been sent."""
    lease = await _reserve(state, context, nbytes, what)
    context.hold(lease)
    return lease
