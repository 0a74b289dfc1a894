"""DynamicBatcher and collect_batch with plain queues and a fake model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.batching import BatchFailed, DeadlineExpired, DynamicBatcher, Job, QueueFull, collect_batch

pytestmark = pytest.mark.anyio
FAR = 1e12  # a deadline that never passes


def _job(loop, payload, enqueued=None):
    return Job(payload, FAR, loop.create_future(), enqueued=enqueued or time.monotonic())


async def test_collect_closes_when_full():
    loop = asyncio.get_running_loop()
    queue = deque(_job(loop, i) for i in range(5))
    batch = await collect_batch(queue, asyncio.Event(), max_size=3, max_delay_s=10)
    assert [j.payload for j in batch] == [0, 1, 2] and len(queue) == 2


async def test_collect_closes_when_first_has_waited_max_delay():
    loop = asyncio.get_running_loop()
    queue, wakeup = deque([_job(loop, "a")]), asyncio.Event()
    started = time.monotonic()
    batch = await collect_batch(queue, wakeup, max_size=8, max_delay_s=0.1)
    assert [j.payload for j in batch] == ["a"]
    assert 0.08 <= time.monotonic() - started < 1.0


async def test_collect_takes_late_arrivals_until_the_delay():
    loop = asyncio.get_running_loop()
    queue, wakeup = deque([_job(loop, 0)]), asyncio.Event()

    async def arrive():
        for i in (1, 2):
            await asyncio.sleep(0.02)
            queue.append(_job(loop, i))
            wakeup.set()

    task = asyncio.create_task(arrive())
    batch = await collect_batch(queue, wakeup, max_size=8, max_delay_s=0.2)
    await task
    assert [j.payload for j in batch] == [0, 1, 2]


async def test_an_old_first_job_closes_the_batch_at_once():
    loop = asyncio.get_running_loop()
    queue = deque([_job(loop, 0, enqueued=time.monotonic() - 5)])
    started = time.monotonic()
    await collect_batch(queue, asyncio.Event(), max_size=8, max_delay_s=1.0)
    assert time.monotonic() - started < 0.05


class FakeModel:
    def __init__(self, delay=0.0):
        self.delay, self.batches, self.threads = delay, [], set()
        self.fail_on = None

    def __call__(self, payloads):
        self.batches.append(list(payloads))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in payloads:
            raise RuntimeError("boom")
        return [p * 10 for p in payloads]


async def _batcher(model, **kw):
    args = dict(max_batch_size=4, max_delay_s=0.01, max_queue=16)
    args.update(kw)
    b = DynamicBatcher(model, **args)
    await b.start()
    return b


async def test_results_go_to_their_own_images_and_batches_form():
    model = FakeModel(delay=0.05)
    b = await _batcher(model)
    jobs = [b.submit([i], FAR)[0] for i in range(10)]
    results = await asyncio.gather(*(j.future for j in jobs))
    assert results == [i * 10 for i in range(10)]
    assert max(len(batch) for batch in model.batches) > 1
    assert all(len(batch) <= 4 for batch in model.batches)
    assert model.threads == {next(iter(model.threads))} and "chanseg-infer" in next(iter(model.threads))
    assert await b.stop(5)


async def test_event_loop_stays_free_during_inference():
    b = await _batcher(FakeModel(delay=0.3))
    job = b.submit([1], FAR)[0]
    ticks = 0
    while not job.future.done():
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks >= 10  # the loop kept running while the model "computed"
    await b.stop(5)


async def test_queue_full_refuses_all_or_nothing():
    b = await _batcher(FakeModel(delay=0.2), max_queue=4)
    first = b.submit([1, 2, 3], FAR)
    with pytest.raises(QueueFull):
        b.submit([4, 5], FAR)
    assert b.depth == 3
    assert await asyncio.gather(*(j.future for j in first)) == [10, 20, 30]
    await b.stop(5)


async def test_failed_batch_fails_only_its_images_and_worker_goes_on():
    model = FakeModel(delay=0.05)
    model.fail_on = 666
    b = await _batcher(model, max_batch_size=2, max_delay_s=0.0)
    bad = b.submit([1, 666], FAR)
    await asyncio.sleep(0.01)
    good = b.submit([2, 3], FAR)
    for job in bad:
        with pytest.raises(BatchFailed, match="boom"):
            await job.future
    assert await asyncio.gather(*(j.future for j in good)) == [20, 30]
    assert b.submit([4], FAR)[0].future is not None
    await b.stop(5)


async def test_expired_and_cancelled_images_are_not_computed():
    model = FakeModel(delay=0.2)
    b = await _batcher(model, max_batch_size=1, max_delay_s=0.0)
    blocker = b.submit([1], FAR)[0]
    await asyncio.sleep(0.02)  # the blocker is computing
    expired = b.submit([2], time.monotonic() + 0.05)[0]
    cancelled = b.submit([3], FAR)[0]
    b.cancel([cancelled])
    await blocker.future
    with pytest.raises(DeadlineExpired):
        await expired.future
    await b.stop(5)
    computed = [p for batch in model.batches for p in batch]
    assert computed == [1]


async def test_stop_finishes_accepted_work_and_refuses_new():
    model = FakeModel(delay=0.05)
    b = await _batcher(model, max_batch_size=2)
    jobs = b.submit([1, 2, 3, 4, 5], FAR)
    stopping = asyncio.create_task(b.stop(10))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        b.submit([6], FAR)
    assert await stopping is True
    assert [j.future.result() for j in jobs] == [10, 20, 30, 40, 50]


async def test_metrics_hooks_observe(tiny_segmenter):
    from service.metrics import Metrics

    metrics = Metrics(4)
    b = await _batcher(FakeModel(), metrics=metrics)
    await asyncio.gather(*(j.future for j in b.submit([1, 2, 3], FAR)))
    await b.stop(5)
    reg = metrics.registry
    assert reg.get_sample_value("chanseg_batch_size_sum") == 3
    assert reg.get_sample_value("chanseg_queue_wait_seconds_count") == 3
    assert reg.get_sample_value("chanseg_inference_duration_seconds_count") >= 1
    assert reg.get_sample_value("chanseg_queue_depth") == 0


@settings(max_examples=25, deadline=None)
@given(
    requests=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=12),
    gaps=st.lists(st.floats(min_value=0, max_value=0.004), min_size=12, max_size=12),
    max_batch=st.integers(min_value=1, max_value=6),
)
def test_every_image_gets_exactly_its_own_result(requests, gaps, max_batch):
    async def scenario():
        model = FakeModel()
        b = DynamicBatcher(model, max_batch_size=max_batch, max_delay_s=0.002, max_queue=64)
        await b.start()
        submitted, next_id = [], 0
        for n, gap in zip(requests, gaps):
            payloads = list(range(next_id, next_id + n))
            next_id += n
            submitted.append((payloads, b.submit(payloads, FAR)))
            await asyncio.sleep(gap)
        for payloads, jobs in submitted:
            assert await asyncio.gather(*(j.future for j in jobs)) == [p * 10 for p in payloads]
        await b.stop(5)
        computed = sorted(p for batch in model.batches for p in batch)
        assert computed == list(range(next_id))  # each exactly once
        assert all(len(batch) <= max_batch for batch in model.batches)

    asyncio.run(scenario())


async def test_batch_closes_at_once_when_nothing_else_is_coming():
    loop = asyncio.get_running_loop()
    queue, wakeup = deque([_job(loop, 0)]), asyncio.Event()
    started = time.monotonic()
    batch = await collect_batch(queue, wakeup, max_size=8, max_delay_s=1.0, incoming=lambda: 0)
    assert len(batch) == 1 and time.monotonic() - started < 0.05


async def test_announced_images_are_waited_for():
    model = FakeModel()
    b = await _batcher(model, max_batch_size=4, max_delay_s=0.5)
    with b.incoming(1):
        first = b.submit([1], FAR)[0]
        await asyncio.sleep(0.05)  # the other image is still "decoding"
        assert not first.future.done()
    second = b.submit([2], FAR)[0]
    assert await asyncio.gather(first.future, second.future) == [10, 20]
    assert model.batches == [[1, 2]]
    await b.stop(5)


async def test_room_is_reserved_before_decoding():
    """incoming() admits against waiting + being-decoded images, and refuses at
    once (before any decoding) when they would not fit."""
    b = await _batcher(FakeModel(delay=0.2), max_batch_size=1, max_queue=4)
    with b.incoming(3):
        with pytest.raises(QueueFull):
            b.incoming(2)
        with b.incoming(1):
            pass
        jobs = b.submit([1, 2, 3], FAR)
    await asyncio.gather(*(j.future for j in jobs))
    await b.stop(5)
    with pytest.raises(QueueFull, match="shutting down"):
        b.incoming(1)


class StreamModel(FakeModel):
    """Records, per batch, its thread, whether it ran shared, and how many ran at once."""

    def __init__(self, delay=0.0):
        super().__init__(delay)
        self.lock, self.running, self.runs = threading.Lock(), 0, []
        self.shared = threading.local()
        self.delay_of = {}  # payload -> extra seconds

    def before_batch(self, shared):
        self.shared.value = shared

    def __call__(self, payloads):
        with self.lock:
            self.running += 1
            at_once = self.running
        try:
            time.sleep(sum(self.delay_of.get(p, 0) for p in payloads))
            result = super().__call__(payloads)
        finally:
            with self.lock:
                self.running -= 1
        self.runs.append((threading.current_thread().name, self.shared.value, at_once, len(payloads)))
        return result


async def test_with_streams_a_full_queue_runs_batches_side_by_side():
    model = StreamModel(delay=0.1)
    b = await _batcher(model, streams=2, before_batch=model.before_batch)
    jobs = b.submit(list(range(16)), FAR)
    assert await asyncio.gather(*(j.future for j in jobs)) == [i * 10 for i in range(16)]
    assert [n for *_, n in model.runs] == [4, 4, 4, 4]
    assert all(shared for _, shared, _, _ in model.runs)  # each batch had more behind it or beside it
    assert max(at_once for _, _, at_once, _ in model.runs) == 2
    assert {thread.rsplit("_", 1)[0] for thread, *_ in model.runs} == {"chanseg-infer", "chanseg-infer-1"}
    assert await b.stop(5)


async def test_with_streams_a_batch_with_nothing_behind_it_runs_alone_on_the_first_stream():
    model = StreamModel(delay=0.2)
    b = await _batcher(model, streams=2, before_batch=model.before_batch)
    first = b.submit([1], FAR)[0]
    await asyncio.sleep(0.05)  # running alone now
    assert 0 < b.busy_for < 0.2
    assert await first.future == 10
    later = b.submit([2, 3], FAR)  # after it, with nothing beside it: alone too
    assert await asyncio.gather(*(j.future for j in later)) == [20, 30]
    assert [(shared, at_once, n) for _, shared, at_once, n in model.runs] == [(False, 1, 1), (False, 1, 2)]
    assert {thread.rsplit("_", 1)[0] for thread, *_ in model.runs} == {"chanseg-infer"}
    assert b.busy_for == 0 and b.busiest_thread is None
    assert await b.stop(5)


async def test_with_streams_requests_that_overlap_run_side_by_side():
    """An image that came while a lone batch ran waits for it, then runs shared, so the
    next to come starts beside it at once; once requests stop overlapping, alone again."""
    model = StreamModel(delay=0.2)
    b = await _batcher(model, streams=2, before_batch=model.before_batch)
    first = b.submit([1], FAR)[0]
    await asyncio.sleep(0.05)  # 1 runs alone
    second = b.submit([2], FAR)[0]  # came while 1 ran
    assert await first.future == 10
    await asyncio.sleep(0.05)  # 2 runs, shared, with nothing behind it
    third = b.submit([3], FAR)[0]  # starts beside 2 rather than after it
    assert await asyncio.gather(second.future, third.future) == [20, 30]
    fourth = b.submit([4], FAR)[0]  # nothing came while 3 ran
    assert await fourth.future == 40
    runs = [(shared, at_once, n) for _, shared, at_once, n in model.runs]
    assert runs == [(False, 1, 1), (True, 1, 1), (True, 2, 1), (False, 1, 1)]
    assert await b.stop(5)


async def test_with_streams_the_watchdog_sees_the_oldest_batch():
    model = StreamModel()
    model.delay_of = {1: 0.5, 2: 0.1, 3: 0.4}
    b = await _batcher(model, streams=2, max_batch_size=1, before_batch=model.before_batch)
    jobs = b.submit([1, 2, 3], FAR)  # 1 and 2 side by side, then 3 beside 1
    await asyncio.sleep(0.25)
    assert 0.2 < b.busy_for < 0.5  # batch 1's time, not batch 3's
    oldest = next(t for t in threading.enumerate() if t.ident == b.busiest_thread)
    assert oldest.name.startswith("chanseg-infer_")  # the first stream took the first batch
    assert await asyncio.gather(*(j.future for j in jobs)) == [10, 20, 30]
    assert all(shared for _, shared, _, _ in model.runs)
    assert max(at_once for _, _, at_once, _ in model.runs) == 2
    assert await b.stop(5)


async def test_with_streams_stop_finishes_both_streams():
    model = StreamModel(delay=0.05)
    b = await _batcher(model, streams=2, max_batch_size=2, before_batch=model.before_batch)
    jobs = b.submit(list(range(9)), FAR)
    assert await b.stop(10) is True
    assert [j.future.result() for j in jobs] == [i * 10 for i in range(9)]
    assert not any(t.name.startswith("chanseg-infer-1") for t in threading.enumerate())
