"""The I/O pool: the threads that probe, decode and encode images (``IO_THREADS``).

``loop.run_in_executor`` on a ``ThreadPoolExecutor`` makes two futures per call, a
``concurrent.futures`` one with its condition variable and an asyncio one chained to
it, and the event loop pays ~70 Python calls to make, chain and settle them. A request
hands off two or more jobs, and on a GPU host the event loop is the thread that
bounds the request rate (``docs/performance.md``, "Host work per image"). Here a call
is one asyncio future and one queue entry: the worker runs the job and settles the
future with one ``call_soon_threadsafe``.

What ``run_in_executor`` promised still holds: a job whose future was cancelled before
a worker took it does not run; one cancelled while it runs finishes and its result is
dropped; ``shutdown(cancel_futures=True)`` cancels what has not started. A worker drops
its job, arguments and result before it waits for the next, so an idle thread holds no
image. Two differences: a job that raises ``StopIteration`` fails with a ``RuntimeError``
(``run_in_executor`` left its future unsettled for ever), and the threads are daemons: a
job still running when the interpreter exits is not waited for (the server's shutdown
has drained its requests by then).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from queue import Empty, SimpleQueue
from typing import Callable, List, Set

from .threads import name_os_thread

__all__ = ["IOPool"]

_STOP = None


class IOPool:
    """``workers`` threads named ``{name}_0`` .. ``{name}_{workers - 1}``, all running
    once the constructor returns (a server's thread count is flat from readiness on)."""

    def __init__(self, workers: int, name: str = "chanseg-io") -> None:
        if workers < 1:
            raise ValueError(f"an I/O pool needs at least one thread, not {workers}")
        self.workers = workers
        self._queue: SimpleQueue = SimpleQueue()
        self._threads: List[threading.Thread] = []
        self._waiting: Set[int] = set()  # the workers waiting for a job (set.add and discard are atomic)
        self._closed = False
        started = threading.Barrier(workers + 1)
        for i in range(workers):
            thread = threading.Thread(target=self._work, args=(started,), name=f"{name}_{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        started.wait(timeout=30)

    @property
    def idle(self) -> int:
        """Workers waiting for a job now: a job handed over at once is taken at once
        (unless another caller's takes that worker first)."""
        return len(self._waiting)

    def call(self, fn: Callable, *args) -> asyncio.Future:
        """``fn(*args)`` on a worker; its result (or exception) as a future of the running loop."""
        if self._closed:
            raise RuntimeError("the I/O pool has been shut down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((loop, future, fn, args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Take no more jobs; with ``cancel_futures`` cancel those no worker has begun
        (call it on the loop that made them). The workers end after their current job."""
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except Empty:
                    break
                if item is not _STOP:
                    item[1].cancel()
        for _ in self._threads:
            self._queue.put(_STOP)
        if wait:
            for thread in self._threads:
                thread.join()

    def _work(self, started: threading.Barrier) -> None:
        name_os_thread()
        started.wait()
        get, me = self._queue.get, threading.get_ident()
        while True:
            self._waiting.add(me)
            item = get()
            self._waiting.discard(me)
            if item is _STOP:
                return
            loop, future, fn, args = item
            del item
            if future.cancelled():  # a plain read of the future's state: at worst the job runs for nothing
                del loop, future, fn, args
                continue
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # the awaiting task gets it, as from run_in_executor
                result, error = None, exc
            del fn, args
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(_settle, future, result, error)
            del loop, future, result, error


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # cancelled while it ran
        return
    if error is None:
        future.set_result(result)
    elif isinstance(error, StopIteration):  # a future cannot hold one: it would never settle
        future.set_exception(RuntimeError(f"the job raised StopIteration: {error!r}"))
    else:
        future.set_exception(error)
