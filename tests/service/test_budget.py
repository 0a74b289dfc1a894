"""MemoryBudget: never over capacity, first come first served, and nothing leaks on timeouts or cancels."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.budget import BudgetExceeded, MemoryBudget
from service.metrics import Metrics

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_grants_at_once_within_capacity_and_refuses_the_impossible():
    budget = MemoryBudget("work", 100)
    a = await budget.reserve(60)
    b = await budget.reserve(40)
    assert budget.in_use == 100
    with pytest.raises(BudgetExceeded):
        await budget.reserve(101)
    a.release()
    a.release()  # idempotent
    b.release()
    assert budget.in_use == 0


async def test_waiters_are_served_in_arrival_order():
    """A large reservation is not starved by small ones that would fit before it."""
    budget = MemoryBudget("work", 100)
    first = await budget.reserve(90)
    order = []

    async def take(name, size):
        lease = await budget.reserve(size)
        order.append(name)
        await asyncio.sleep(0.01)
        lease.release()

    tasks = [asyncio.create_task(take("big", 80)), asyncio.create_task(take("small", 5))]
    await asyncio.sleep(0.01)
    assert order == []  # the small one fits, but the big one came first
    first.release()
    await asyncio.gather(*tasks)
    assert order == ["big", "small"]
    assert budget.in_use == 0


async def test_try_reserve_takes_room_now_or_nothing_and_never_jumps_the_queue():
    budget = MemoryBudget("work", 100)
    held = budget.try_reserve(60)
    assert held is not None and held.nbytes == 60 and budget.in_use == 60
    assert budget.try_reserve(41) is None and budget.in_use == 60  # no room: nothing taken, nothing waits
    assert budget.waiting == 0
    waiter = asyncio.create_task(budget.reserve(50))
    await asyncio.sleep(0.01)
    assert budget.waiting == 1
    assert budget.try_reserve(10) is None  # it would fit, but someone came first
    held.release()
    lease = await asyncio.wait_for(waiter, 1)
    small = budget.try_reserve(10)
    assert small is not None and budget.in_use == 60
    small.release()
    lease.release()
    assert budget.in_use == 0


async def test_timeout_and_cancel_leave_nothing_behind():
    budget = MemoryBudget("work", 100)
    held = await budget.reserve(100)
    with pytest.raises(asyncio.TimeoutError):
        await budget.reserve(50, timeout=0.01)
    waiter = asyncio.create_task(budget.reserve(50))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    later = asyncio.create_task(budget.reserve(100))
    held.release()
    lease = await asyncio.wait_for(later, 1)
    assert budget.in_use == 100 and budget.waiting == 0
    lease.release()
    assert budget.in_use == 0


async def test_shrink_gives_back_the_difference_and_wakes_a_waiter():
    budget = MemoryBudget("body", 100)
    lease = await budget.reserve(100)
    waiter = asyncio.create_task(budget.reserve(70))
    await asyncio.sleep(0.01)
    lease.shrink(30)
    other = await asyncio.wait_for(waiter, 1)
    assert budget.in_use == 100
    lease.release()
    other.release()
    assert budget.in_use == 0


async def test_metrics_follow_the_ledger():
    metrics = Metrics(4)
    budget = MemoryBudget("work", 1000, metrics)

    def sample(name):
        return metrics.registry.get_sample_value(name, {"ledger": "work"})

    lease = await budget.reserve(300)
    assert sample("chanseg_memory_reserved_bytes") == 300
    assert sample("chanseg_memory_budget_bytes") == 1000
    lease.release()
    assert sample("chanseg_memory_reserved_bytes") == 0


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 1000),
    requests=st.lists(
        st.tuples(st.integers(0, 1200), st.floats(0, 0.003), st.sampled_from([None, 0.002, 1.0])),
        min_size=1,
        max_size=25,
    ),
)
def test_never_over_capacity_and_every_request_ends(capacity, requests):
    """Concurrent reservations of random sizes, holds and timeouts: the ledger never
    exceeds its capacity, each request is granted, times out or is refused as
    impossible, and everything is given back."""

    async def scenario():
        budget = MemoryBudget("work", capacity)

        async def one(size, hold, timeout):
            try:
                lease = await budget.reserve(size, timeout=timeout)
            except BudgetExceeded:
                return "refused"
            except asyncio.TimeoutError:
                return "timeout"
            assert budget.in_use <= capacity
            await asyncio.sleep(hold)
            lease.release()
            return "granted"

        outcomes = await asyncio.wait_for(asyncio.gather(*(one(*r) for r in requests)), 10)
        assert budget.in_use == 0 and budget.waiting == 0
        for (size, _, timeout), outcome in zip(requests, outcomes):
            if size > capacity:
                assert outcome == "refused"
            elif timeout is None:
                assert outcome == "granted"  # whoever waits without a deadline gets in

    asyncio.run(scenario())
