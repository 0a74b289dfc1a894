"""The I/O pool (service/iopool.py): what run_in_executor promised, with one future a call."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import pytest

from service.iopool import IOPool


class Image:  # something a job holds that a weak reference can watch
    pass


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def pool():
    pool = IOPool(2, name="test-io")
    yield pool
    pool.shutdown(wait=True)


def test_all_threads_run_named_before_the_first_job(pool):
    names = sorted(t.name for t in threading.enumerate() if t.name.startswith("test-io_"))
    assert names == ["test-io_0", "test-io_1"]
    assert pool.workers == 2
    with pytest.raises(ValueError, match="at least one thread"):
        IOPool(0)


def _until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    return condition()


def test_idle_counts_the_workers_waiting_for_a_job(pool):
    """What preprocess asks before it reserves a decoding ahead: a worker free to take a job now."""
    assert _until(lambda: pool.idle == 2)
    held, running = threading.Event(), threading.Event()

    def job():
        running.set()
        held.wait(5)

    async def main():
        first = pool.call(job)
        assert await asyncio.to_thread(running.wait, 5)
        during_one = pool.idle
        running.clear()
        second = pool.call(job)
        assert await asyncio.to_thread(running.wait, 5)
        during_two = pool.idle
        held.set()
        await first
        await second
        return during_one, during_two

    assert run(main()) == (1, 0)
    assert _until(lambda: pool.idle == 2)


def test_results_and_exceptions_reach_the_awaiting_task(pool):
    async def main():
        worker = await pool.call(lambda: threading.current_thread().name)
        total = await pool.call(sum, [1, 2, 3])
        with pytest.raises(ZeroDivisionError):
            await pool.call(lambda: 1 / 0)
        return worker, total

    worker, total = run(main())
    assert worker.startswith("test-io_") and total == 6


def test_a_job_raising_stop_iteration_fails_instead_of_hanging(pool):
    def stop():
        raise StopIteration("done")

    async def main():
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(pool.call(stop), 5)

    run(main())


def test_jobs_run_side_by_side(pool):
    both = threading.Barrier(2, timeout=10)  # each job waits for the other: one thread would deadlock

    async def main():
        return await asyncio.gather(pool.call(both.wait), pool.call(both.wait))

    assert sorted(run(main())) == [0, 1]


def test_a_job_cancelled_before_it_starts_does_not_run():
    pool = IOPool(1, name="test-io-one")
    release, ran = threading.Event(), []
    try:

        async def main():
            busy = pool.call(release.wait, 10)  # the only worker is busy
            queued = pool.call(ran.append, "queued")
            queued.cancel()
            release.set()
            await busy
            await pool.call(ran.append, "after")  # the worker has passed the cancelled job by now

        run(main())
        assert ran == ["after"]
    finally:
        release.set()
        pool.shutdown(wait=True)


def test_a_job_cancelled_while_it_runs_finishes_and_its_result_is_dropped(pool):
    started, release = threading.Event(), threading.Event()
    errors = []

    def job():
        started.set()
        release.wait(10)
        return "late"

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        future = pool.call(job)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        future.cancel()
        release.set()
        assert await pool.call(lambda: "next") == "next"  # the late result was settled, or dropped, by now
        await asyncio.sleep(0.05)
        return future

    future = run(main())
    assert future.cancelled() and errors == []


def test_shutdown_cancels_what_has_not_started_and_refuses_more():
    pool = IOPool(1, name="test-io-one")
    started, release = threading.Event(), threading.Event()

    def job():
        started.set()
        return release.wait(10)

    async def main():
        busy = pool.call(job)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        waiting = [pool.call(lambda: "never") for _ in range(3)]
        pool.shutdown(wait=False, cancel_futures=True)
        assert all(f.cancelled() for f in waiting)
        with pytest.raises(RuntimeError, match="shut down"):
            pool.call(lambda: None)
        release.set()
        return await busy

    assert run(main()) is True
    pool.shutdown(wait=True)
    assert not any(t.name.startswith("test-io-one_") for t in threading.enumerate())


def test_an_idle_worker_holds_nothing_of_its_last_job(pool):
    """A decoded image lives as long as its request, not until the thread's next job."""
    held = []

    async def main():
        image = Image()
        held.append(weakref.ref(image))
        result = await pool.call(lambda im: [im], image)
        assert result[0] is image
        failing = Image()
        held.append(weakref.ref(failing))

        def fail(im):
            raise ValueError("bad image")

        with pytest.raises(ValueError):
            await pool.call(fail, failing)

    run(main())
    deadline = time.monotonic() + 2  # the worker lets go just after it hands the result over
    while any(ref() is not None for ref in held) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert [ref() for ref in held] == [None, None]


def test_a_loop_closed_before_the_job_ends_leaves_the_worker_serving():
    pool = IOPool(1, name="test-io-one")
    release = threading.Event()
    loop = asyncio.new_event_loop()

    async def start():
        return pool.call(release.wait, 10)

    try:
        loop.run_until_complete(start())
        loop.close()
        release.set()  # its result has nowhere to go
        assert run(_call(pool, lambda: "still here")) == "still here"
    finally:
        release.set()
        pool.shutdown(wait=True)


async def _call(pool, fn):
    return await pool.call(fn)
