"""The memory budget: bytes that all requests in flight may hold together.

Per-image limits do not bound a server: sixteen legal 36 Mpx images decoded
at once by eight threads took one process to 14 GiB. Every large allocation a
request makes (its body, each image while it is decoded and resized, each
full-size mask or tensor it sends back) is first reserved here, by size,
from one of two ledgers:

- ``body``: request bodies while they are read and held;
- ``work``: decoding, v2 parsing and outputs.

Two ledgers, not one: a request holds its body while it waits for decoding
room, so bodies alone must never be able to take all of the room decoding
needs. Within a ledger, reservations are granted first come, first served: a
large image waits its turn and is not starved by a stream of small ones. A
reservation larger than the whole ledger can never be granted and raises
:class:`BudgetExceeded` at once (the caller answers 413); one that cannot be
granted before its deadline raises ``TimeoutError`` (503, not now).

Everything here runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any, AsyncIterator, Deque, Optional, Tuple

__all__ = ["BudgetExceeded", "Lease", "MemoryBudget", "MIB"]

MIB = 1 << 20


class BudgetExceeded(Exception):
    """A reservation larger than the whole ledger: it could never be granted."""

    def __init__(self, nbytes: int, capacity: int, ledger: str) -> None:
        super().__init__(
            f"{nbytes / MIB:.0f} MiB is more than the {ledger} budget of {capacity / MIB:.0f} MiB"
        )
        self.nbytes, self.capacity, self.ledger = nbytes, capacity, ledger


class Lease:
    """Bytes granted by a :class:`MemoryBudget`; ``release`` (idempotent) gives them back."""

    __slots__ = ("budget", "nbytes")

    def __init__(self, budget: "MemoryBudget", nbytes: int) -> None:
        self.budget, self.nbytes = budget, nbytes

    def release(self) -> None:
        if self.nbytes:
            nbytes, self.nbytes = self.nbytes, 0
            self.budget._give_back(nbytes)

    def shrink(self, nbytes: int) -> None:
        """Keep only ``nbytes`` (when less turned out to be needed)."""
        if 0 <= nbytes < self.nbytes:
            freed, self.nbytes = self.nbytes - nbytes, nbytes
            self.budget._give_back(freed)


class MemoryBudget:
    """A ledger of ``capacity`` bytes.

    Args:
        name: ``body`` or ``work``; the label of its metrics.
        capacity: bytes that may be reserved at once.
        metrics: optional :class:`service.metrics.Metrics` (reserved bytes gauge,
            wait histogram).
    """

    def __init__(self, name: str, capacity: int, metrics: Any = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.name, self.capacity = name, capacity
        self.in_use = 0
        self._waiters: Deque[Tuple[int, asyncio.Future]] = deque()
        self._wait_histogram = None  # this ledger's child, looked up once
        if metrics is not None:
            metrics.memory_budget.labels(name).set(capacity)
            # Read when scraped, not set at every reservation (docs/performance.md).
            metrics.memory_reserved.labels(name).set_function(lambda: self.in_use)
            self._wait_histogram = metrics.memory_wait.labels(name)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def reserve(self, nbytes: int, timeout: Optional[float] = None) -> Lease:
        """Wait (first come, first served) until ``nbytes`` fit, then take them.

        Raises:
            BudgetExceeded: ``nbytes`` is more than the whole capacity.
            TimeoutError: not granted within ``timeout`` seconds.
        """
        nbytes = max(0, int(nbytes))
        if nbytes > self.capacity:
            raise BudgetExceeded(nbytes, self.capacity, self.name)
        lease = self.try_reserve(nbytes)
        if lease is not None:
            return lease
        started = time.perf_counter()
        future = asyncio.get_running_loop().create_future()
        entry = (nbytes, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except BaseException:
            if future.done() and not future.cancelled():
                self._give_back(nbytes)  # granted while we were being cancelled
            else:
                future.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._grant()  # the next in line may fit now
            raise
        finally:
            if self._wait_histogram is not None:
                self._wait_histogram.observe(time.perf_counter() - started)
        return Lease(self, nbytes)

    def try_reserve(self, nbytes: int) -> Optional[Lease]:
        """``nbytes`` now, when they fit and nobody is waiting (no jumping the queue); else None."""
        nbytes = max(0, int(nbytes))
        if self._waiters or self.in_use + nbytes > self.capacity:
            return None
        self.in_use += nbytes
        return Lease(self, nbytes)

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int, timeout: Optional[float] = None) -> AsyncIterator[Lease]:
        """``async with budget.hold(n):`` reserve, then release on the way out."""
        lease = await self.reserve(nbytes, timeout)
        try:
            yield lease
        finally:
            lease.release()

    def _give_back(self, nbytes: int) -> None:
        self.in_use -= nbytes
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            nbytes, future = self._waiters[0]
            if future.done():  # cancelled: its reserve() removes it, skip it meanwhile
                self._waiters.popleft()
                continue
            if self.in_use + nbytes > self.capacity:
                return
            self._waiters.popleft()
            self.in_use += nbytes
            future.set_result(None)
