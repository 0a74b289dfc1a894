"""Dynamic batching: one bounded FIFO queue of images from all requests.

Lifecycle of an image: the request reserves room for it before decoding
(``incoming``: refused at once with ``QueueFull`` when ``max_queue`` images
already wait or are being decoded), then ``submit``s it -> ``collect_batch`` fills
a batch until it holds ``max_batch_size`` images or its first image has waited
``max_delay_s`` (or nothing else is on its way: no image queued, none being
decoded) -> images whose request expired or went away are dropped ->
one ``infer`` call runs the rest on a dedicated thread, so the event loop
never blocks and the next batch queues up meanwhile -> each image's future
gets its own result. A result that is an exception fails only its image
(``BatchFailed``: ``infer`` may isolate a bad image that way); an exception
raised by ``infer`` is logged once and fails that batch's images; the worker
goes on. ``busy_for`` says
how long the oldest running batch has been on the device: the liveness
watchdog reads it to tell a stuck inference thread from a busy one.

Streams (``streams`` > 1): while images keep coming, up to ``streams``
batches run side by side, each on a thread of its own (``shared``); a batch
with nothing queued or on its way behind it runs alone, and no other starts
until it ends, unless requests overlap: when an image came while the last
batch ran, more will likely come while this one runs, so it runs shared and
the next can start beside it. ``before_batch(shared)`` is called on the batch's
thread first: the server gives a batch alone all of torch's threads and each of
the side by side ones its share (``service.state``), so a lone request keeps the
latency of the whole CPU while a busy server runs independent forward passes.

No web framework here: the batcher is tested with a plain function as model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Deque, Dict, Iterator, List, Optional, Sequence, Set

from .threads import name_os_thread

__all__ = [
    "Job", "QueueFull", "DeadlineExpired", "BatchFailed", "collect_batch", "DynamicBatcher", "inference_pool",
]  # fmt: skip

log = logging.getLogger("chanseg.batching")


def inference_pool(name: str) -> ThreadPoolExecutor:
    """One inference thread, named for ``top -H`` and perf as well (its OpenMP workers inherit the name)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=name_os_thread)


class QueueFull(Exception):
    """The queue cannot take the images (it is full, or the batcher is stopping)."""


class DeadlineExpired(Exception):
    """The image's deadline passed before its batch started."""


class BatchFailed(Exception):
    """The batch holding this image raised; the message is the batch's error."""


@dataclass(eq=False)
class Job:
    """One image in the queue."""

    payload: Any
    deadline: float  # time.monotonic() after which the result is worthless
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0  # when its batch began inference
    inference_s: float = 0.0  # its batch's inference time
    batch_size: int = 0

    @property
    def abandoned(self) -> bool:
        return self.future.done()  # cancelled by its request, or already failed

    @property
    def queue_s(self) -> float:
        return self.started - self.enqueued if self.started else 0.0


async def collect_batch(
    queue: Deque[Job],
    wakeup: asyncio.Event,
    max_size: int,
    max_delay_s: float,
    clock: Callable[[], float] = time.monotonic,
    incoming: Optional[Callable[[], int]] = None,
) -> List[Job]:
    """Take up to ``max_size`` jobs: wait for one, then fill until full or until
    the first has waited ``max_delay_s``, or, when ``incoming`` is given, until
    the queue is empty and ``incoming()`` says no more images are on their way
    (waiting then would only add latency). Returns ``[]`` when woken with an
    empty queue (how ``stop`` interrupts the wait)."""
    if not queue:
        wakeup.clear()
        await wakeup.wait()
        if not queue:
            return []
    close_at = queue[0].enqueued + max_delay_s
    batch: List[Job] = []
    while True:
        while queue and len(batch) < max_size:
            batch.append(queue.popleft())
        remaining = close_at - clock()
        if (
            len(batch) >= max_size
            or remaining <= 0
            or (incoming is not None and not queue and incoming() == 0)
        ):
            return batch
        wakeup.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wakeup.wait(), remaining)


class DynamicBatcher:
    """Runs ``infer(payloads) -> results`` (one result per payload) on batches.

    Args:
        infer: called on the inference thread with a list of payloads.
        max_batch_size: most images per ``infer`` call.
        max_delay_s: longest the first image of a batch waits for company.
        max_queue: most images waiting (not yet in a running batch).
        metrics: optional object with ``queue_wait``, ``inference``,
            ``batch_size`` histograms and a ``queue_depth`` gauge.
        executor: the one-thread executor ``infer`` runs on; the caller's
            (kept open by ``stop``) when given, else the batcher's own. The
            server passes its inference thread, which also loaded and warmed
            up the model: every batch that runs alone runs there.
        streams: most batches running at once (see the module docstring); the
            batcher starts a thread for each beyond the first.
        before_batch: called with ``shared`` on a batch's thread before ``infer``.
    """

    def __init__(
        self,
        infer: Callable[[List[Any]], Sequence[Any]],
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        metrics: Any = None,
        executor: Optional[ThreadPoolExecutor] = None,
        streams: int = 1,
        before_batch: Optional[Callable[[bool], None]] = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_delay_s < 0 or streams < 1:
            raise ValueError("max_batch_size, max_queue and streams must be >= 1, max_delay_s >= 0")
        self.infer = infer
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.metrics = metrics
        if metrics is not None:  # read when scraped, not set at every change (docs/performance.md)
            metrics.queue_depth.set_function(lambda: self.depth)
        self._queue: Deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self._waiting = 0  # in the queue or in the batch being collected
        self._running = 0  # in the batches being computed
        self._incoming = 0  # announced by requests still decoding, not yet submitted
        self._executor: Optional[ThreadPoolExecutor] = executor
        self._owns_executor = executor is None
        self.streams = streams
        self.before_batch = before_batch
        self._extra: List[ThreadPoolExecutor] = []  # the streams' threads beyond the first
        self._free: List[ThreadPoolExecutor] = []  # streams not running a batch
        self._alone = False  # a batch runs alone: no other may start
        self._overlapped = False  # an image came while a batch ran, since the last batch began
        self._finished = asyncio.Event()  # set when a batch ends
        self._batches: Set[asyncio.Task] = set()
        self._task: Optional[asyncio.Task] = None
        self._busy_since: Dict[int, float] = {}  # thread ident -> time.monotonic() its batch began
        self._accepting = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def depth(self) -> int:
        """Images accepted and not yet computed."""
        return self._waiting + self._running

    @property
    def busy_for(self) -> float:
        """Seconds the oldest running batch has been computing; 0 when none runs."""
        since = min(tuple(self._busy_since.values()), default=None)  # the threads change it
        return time.monotonic() - since if since is not None else 0.0

    @property
    def busiest_thread(self) -> Optional[int]:
        """The thread running the oldest batch (for the watchdog's stack dump)."""
        busy = dict(self._busy_since)
        return min(busy, key=busy.__getitem__) if busy else None

    def has_room(self, count: int = 1) -> bool:
        """Whether ``count`` more images would be admitted now (checked before a
        request's body is read, so a full server reads nothing it will refuse)."""
        return self._accepting and self._waiting + self._incoming + count <= self.max_queue

    async def start(self) -> None:
        if self._executor is None:
            self._executor = inference_pool("chanseg-infer")
        self._extra = [inference_pool(f"chanseg-infer-{i}") for i in range(1, self.streams)]
        self._free = [*reversed(self._extra), self._executor]  # pop() takes the first stream first
        self._accepting = True
        self._task = asyncio.create_task(self._loop(), name="chanseg-batcher")

    def incoming(self, count: int) -> ContextManager[None]:
        """Reserve queue room for ``count`` images about to be decoded and prepared.

        Raises :class:`QueueFull` at once when they would not fit, so an overloaded
        server refuses before spending any decoding on them. While the returned
        context is held, a forming batch waits for these images (up to
        ``max_delay_s``) instead of closing early; ``submit`` them before leaving it.
        """
        if not self._accepting:
            raise QueueFull("the server is shutting down")
        if self._waiting + self._incoming + count > self.max_queue:
            raise QueueFull(
                f"queue full ({self._waiting} waiting + {self._incoming} being decoded, of {self.max_queue})"
            )
        self._incoming += count
        return self._announced(count)

    @contextlib.contextmanager
    def _announced(self, count: int) -> Iterator[None]:
        try:
            yield
        finally:
            self._incoming -= count

    def submit(self, payloads: Sequence[Any], deadline: float) -> List[Job]:
        """Queue all payloads or none; raises :class:`QueueFull` when they do not fit."""
        if not self._accepting:
            raise QueueFull("the server is shutting down")
        if self._waiting + len(payloads) > self.max_queue:
            raise QueueFull(f"queue full ({self._waiting} of {self.max_queue} images waiting)")
        loop = asyncio.get_running_loop()
        jobs = [Job(p, deadline, loop.create_future()) for p in payloads]
        self._overlapped = self._overlapped or self._running > 0
        self._queue.extend(jobs)
        self._waiting += len(jobs)
        self._idle.clear()
        self._wakeup.set()
        return jobs

    @staticmethod
    def cancel(jobs: Sequence[Job]) -> None:
        """Abandon jobs (request timed out or went away): they are skipped, not computed."""
        for job in jobs:
            if not job.future.done():
                job.future.cancel()

    async def stop(self, timeout: float) -> bool:
        """Stop accepting, finish what was accepted (at most ``timeout`` s), end the worker.

        Returns True when everything accepted was finished."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            drained = True
        except asyncio.TimeoutError:
            drained = False
            log.warning("drain timeout: %d image(s) not computed", self.depth)
            for job in list(self._queue):
                job.future.cancel()
        for task in [self._task, *self._batches]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for executor in self._extra:
            executor.shutdown(wait=drained, cancel_futures=True)
        if self._executor is not None and self._owns_executor:
            self._executor.shutdown(wait=drained, cancel_futures=True)
        return drained

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._free or self._alone:
                self._finished.clear()
                await self._finished.wait()
            # No local keeps the batch: its jobs' models must be freeable once answered
            # (a model unloaded after the last batch is freed before the next one comes).
            self._dispatch(
                loop,
                await collect_batch(
                    self._queue,
                    self._wakeup,
                    self.max_batch_size,
                    self.max_delay_s,
                    incoming=lambda: self._incoming,
                ),
            )

    def _dispatch(self, loop, batch: List[Job]) -> None:
        """Start a collected batch on a stream, less the jobs abandoned or expired meanwhile."""
        if not batch:
            return
        now = time.monotonic()
        self._waiting -= len(batch)
        live = []
        for job in batch:
            if job.abandoned:
                continue
            if now >= job.deadline:
                job.future.set_exception(DeadlineExpired("deadline passed while queued"))
                continue
            job.started = now
            live.append(job)
        if not live:
            self._check_idle()
            return
        # Side by side while another batch runs, more images wait or are on their way,
        # or requests overlap: one came while the last batch ran, so more will come while
        # this one runs (a lone batch would hold them back).
        busy = self._running or self._queue or self._incoming or self._overlapped
        shared = self.streams > 1 and bool(busy)
        self._overlapped = False
        executor = self._free.pop() if shared else self._take_first_stream()
        self._alone = not shared
        self._running += len(live)
        task = asyncio.create_task(self._stream(loop, live, executor, shared))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    def _take_first_stream(self) -> ThreadPoolExecutor:
        self._free.remove(self._executor)
        return self._executor

    async def _stream(self, loop, jobs: List[Job], executor: ThreadPoolExecutor, shared: bool) -> None:
        try:
            await self._run(loop, jobs, executor, shared)
        finally:
            self._free.append(executor)
            self._alone = False
            self._running -= len(jobs)
            self._check_idle()
            self._finished.set()

    def _check_idle(self) -> None:
        if not self._queue and self._waiting == 0 and self._running == 0:
            self._idle.set()

    def _timed_infer(self, payloads: List[Any], shared: bool) -> Sequence[Any]:
        # On the inference thread itself: busy_for follows the thread, not the
        # awaiting task (which shutdown may cancel while the thread runs on).
        thread = threading.get_ident()
        self._busy_since[thread] = time.monotonic()
        try:
            if self.before_batch is not None:
                self.before_batch(shared)
            return self.infer(payloads)
        finally:
            del self._busy_since[thread]

    async def _run(self, loop, jobs: List[Job], executor: ThreadPoolExecutor, shared: bool) -> None:
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(
                executor, self._timed_infer, [j.payload for j in jobs], shared
            )
            if len(results) != len(jobs):
                raise RuntimeError(f"infer returned {len(results)} results for {len(jobs)} inputs")
        except Exception as exc:  # one failed batch must not stop the worker
            requests = sorted({str(getattr(j.payload, "request_id", "") or "?") for j in jobs})
            log.error(
                "batch of %d image(s) failed (requests %s): %s",
                len(jobs),
                ", ".join(requests),
                exc,
                exc_info=exc,
                extra={"request_ids": requests},
            )
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(BatchFailed(f"{type(exc).__name__}: {exc}"))
            return
        elapsed = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.inference.observe(elapsed)
            self.metrics.batch_size.observe(len(jobs))
            for job in jobs:
                self.metrics.queue_wait.observe(job.queue_s)
        for job, result in zip(jobs, results):
            job.inference_s, job.batch_size = elapsed, len(jobs)
            if job.future.done():
                continue
            if isinstance(result, BaseException):  # this image alone failed; infer logged it
                job.future.set_exception(BatchFailed(f"{type(result).__name__}: {result}"))
            else:
                job.future.set_result(result)
