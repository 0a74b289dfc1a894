"""service.pipeline's own helpers (the request path through them is tested end to end
in test_app and test_predict_direct)."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import numpy as np
import pytest
import torch

from model.rle import column_runs
from service.pipeline import _each, _first, mask_rles, mask_rles_cost
from tests.service.fake_model import FakeModel


async def _where(caller: asyncio.Task, i: int, delay: float):
    await asyncio.sleep(delay)
    return i, asyncio.current_task() is caller


def test_one_awaitable_runs_in_the_callers_task_and_many_keep_their_order():
    """A one-image request's decode and encode are awaited in the request's own task (no
    task and no gathering future of their own); several run as gather runs them, the
    results in the order given whatever order they finish in."""

    async def main():
        caller = asyncio.current_task()
        one = await _each([_where(caller, 0, 0)])
        many = await _each([_where(caller, i, d) for i, d in ((0, 0.03), (1, 0), (2, 0.01))])
        return one, many

    one, many = asyncio.run(main())
    assert one == [(0, True)]
    assert many == [(0, False), (1, False), (2, False)]


def test_first_returns_at_the_first_of_two_or_the_timeout_and_leaves_both_as_they_are():
    """segment's wait for its result, the client going away or the deadline (as
    ``asyncio.wait(FIRST_COMPLETED)`` waits): whichever comes first ends it, the other future
    is untouched, and a caller cancelled while it waits leaves both pending and usable."""

    async def main():
        loop = asyncio.get_running_loop()
        result, gone = loop.create_future(), loop.create_future()
        loop.call_later(0.02, gone.set_result, None)
        started = time.monotonic()
        await _first(result, gone, 5)
        by_gone = (time.monotonic() - started, result.done(), gone.done())
        result, gone = loop.create_future(), loop.create_future()
        loop.call_later(0.02, result.set_result, 7)
        await _first(result, gone, 5)
        by_result = (result.result(), gone.done())
        started = time.monotonic()
        await _first(result := loop.create_future(), gone := loop.create_future(), 0.05)
        by_timeout = (time.monotonic() - started, result.done(), gone.done())
        waiting = asyncio.create_task(_first(result, gone, 5))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        result.set_result(1)  # neither was cancelled; both still take a result
        gone.set_result(2)
        return by_gone, by_result, by_timeout, (result.result(), gone.result())

    by_gone, by_result, by_timeout, after_cancel = asyncio.run(main())
    assert by_gone[0] < 1 and by_gone[1:] == (False, True)
    assert by_result == (7, False)
    assert 0.04 <= by_timeout[0] < 1 and by_timeout[1:] == (False, False)
    assert after_cancel == (1, 2)


@pytest.mark.parametrize("count", [1, 3])
def test_an_error_reaches_the_caller_and_the_others_finish(count):
    finished = []

    async def work(i: int):
        await asyncio.sleep(0.01 * i)
        if i == 0:
            raise ValueError("image 0 is bad")
        finished.append(i)
        return i

    async def main():
        with pytest.raises(ValueError, match="image 0 is bad"):
            await _each([work(i) for i in range(count)])
        await asyncio.sleep(0.1)  # gather leaves the others running: their leases go back in their own time

    asyncio.run(main())
    assert sorted(finished) == list(range(1, count))


def _rows_alternate(h: int, w: int) -> np.ndarray:
    return np.tile(np.array([[0], [2]], np.uint8), (h // 2, w))


@pytest.mark.parametrize("kind", ["rows alternate", "noise", "blobs", "one class"])
def test_an_rle_answers_reservation_covers_what_it_holds(kind):
    """mask_rles_cost, from the labels alone, is at least what mask_rles holds at its peak
    (tracemalloc: numpy's arrays and the strings), the mask included: for a mask of
    stripes (a run a pixel, column by column) as for blobs, restored larger and smaller."""
    rng = np.random.default_rng(11)
    labels = {
        "rows alternate": _rows_alternate(32, 32),
        "noise": rng.integers(0, 3, (32, 32), dtype=np.uint8),
        "blobs": np.kron(rng.integers(0, 3, (4, 4), dtype=np.uint8), np.ones((8, 8), np.uint8)),
        "one class": np.ones((32, 32), np.uint8),
    }[kind]
    fake = FakeModel()
    mask_rles(fake, torch.from_numpy(labels), (8, 8))  # numpy's first calls import and cache
    for size in [(32, 32), (64, 9000), (700, 300), (20, 20), (3, 5000)]:
        tensor = torch.from_numpy(labels)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            rles = mask_rles(fake, tensor, size)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert peak <= mask_rles_cost(tensor, size), (size, peak, mask_rles_cost(tensor, size))
        assert all(rle["size"] == list(size) for rle in rles.values())


def test_column_runs_bounds_the_restored_masks_runs():
    rng = np.random.default_rng(12)
    for labels in (
        _rows_alternate(32, 32),
        rng.integers(0, 3, (17, 23), dtype=np.uint8),
        np.zeros((5, 1), np.uint8),
    ):
        for size in [labels.shape, (64, 9000), (7, 3), (1, 1), (1000, 2)]:
            columns = FakeModel().restore(torch.from_numpy(labels).T, (size[1], size[0])).ravel()
            runs = 1 + int(np.count_nonzero(columns[1:] != columns[:-1]))
            assert runs <= column_runs(labels, size), (labels.shape, size)
