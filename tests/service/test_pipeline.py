"""service.pipeline's own helpers (the request path through them is tested end to end
in test_app and test_predict_direct)."""

from __future__ import annotations

import asyncio

import pytest

from service.pipeline import _each


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
