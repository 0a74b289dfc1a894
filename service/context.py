"""``RequestContext``: what one request carries through the layers, whichever protocol
brought it. The HTTP middleware (:mod:`service.middleware`) and the gRPC servicer
(:mod:`service.grpc_server`) each build one; the data plane and the pipeline read it.

It holds the request's id (for logs and traces), when it started and so its deadline,
the memory reservations it holds until its response is sent (``hold``; the protocol's
entry releases them at the end, ``release``), how to learn that the client went away
(``gone``, or ``wait_gone``), and what the access log reports of it (images, queue and inference time).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, List, Optional

from .budget import Lease

__all__ = ["RequestContext", "new_request_id"]


def new_request_id() -> str:
    """An id for a request whose client gave none: 128 random bits as 32 hex digits, as
    ``uuid.uuid4().hex`` writes them, from Python's generator (seeded by the OS, and again
    in a forked child) instead of a ``getrandom`` syscall per request: ~3% of the event
    loop's CPU per ``/predict`` on a VM (docs/performance.md). The id names a request in
    logs and traces; it guards nothing."""
    return f"{random.getrandbits(128):032x}"


async def _never() -> None:
    await asyncio.Event().wait()


@dataclass(eq=False)
class RequestContext:
    """One request, as every layer below its protocol's entry sees it."""

    request_id: str
    timeout_s: float  # REQUEST_TIMEOUT_S: from ``started`` to the deadline
    started: float = field(default_factory=time.monotonic)  # time.monotonic()
    wait_gone: Callable[[], Awaitable[None]] = _never  # returns once the client has gone away
    # Settled once the client has gone away, where the protocol tells (service.server: the
    # connection is lost); None: ask wait_gone, in a task of its own.
    gone: Optional[asyncio.Future] = None
    id_given: bool = False  # request_id is the client's (X-Request-ID, gRPC x-request-id), not made here
    leases: List[Lease] = field(default_factory=list)
    released: bool = False
    # For the access log: filled in once the images were computed.
    images: int = 0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    # For the model's statistics (service.statistics): set once its images are queued.
    model_stats: Optional[Any] = None  # the served version's VersionStatistics
    computed_at: float = 0.0  # time.monotonic() when its images' results came back

    @property
    def deadline(self) -> float:
        """time.monotonic() after which the request's result is worthless."""
        return self.started + self.timeout_s

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def hold(self, lease: Lease) -> None:
        """Keep ``lease`` until the response has been sent (at once, if that is over)."""
        if self.released:
            lease.release()
        else:
            self.leases.append(lease)

    def finish(self, ok: bool) -> None:
        """The request is over (``ok``: answered without error): its model's statistics
        count it, once, when its images reached the batch queue."""
        stats, self.model_stats = self.model_stats, None
        if stats is None:
            return
        now = time.monotonic()
        output_s = now - self.computed_at if ok and self.computed_at else 0.0
        stats.request(ok, now - self.started, self.queue_ms / 1000, self.inference_ms / 1000, output_s)

    def release(self) -> None:
        """The response has been sent, or never will be: every reservation goes back (idempotent)."""
        self.released = True
        for lease in self.leases:
            lease.release()
