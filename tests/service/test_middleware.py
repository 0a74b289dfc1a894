"""The request middleware's body deadline, in-process (the real server's 408s are in
test_guards.py): one timer for the whole body cuts a read that waits past it and
refuses a read asked for after it, and leaves the task free to answer; and the ids it
makes for requests that bring none."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest
from prometheus_client import CollectorRegistry

from service.context import new_request_id
from service.errors import RequestTimeout
from service.metrics import Metrics
from service.middleware import RequestMiddleware

SCOPE = {
    "type": "http", "method": "POST", "path": "/echo", "query_string": b"",
    "headers": [(b"content-length", b"30")],
}  # fmt: skip


def serve(app, receive, read_timeout_s=0.2):
    """Run ``app`` behind the middleware; what it sent."""
    sent = []

    async def send(message):
        sent.append(message)

    middleware = RequestMiddleware(
        app, Metrics(4, registry=CollectorRegistry()), max_upload_bytes=1000, read_timeout_s=read_timeout_s
    )
    asyncio.run(middleware(dict(SCOPE), receive, send))
    return sent


def chunks(*delays):
    """A receive that hands out 10 bytes after each delay (the last with more_body False)."""
    left = list(delays)

    async def receive():
        await asyncio.sleep(left.pop(0))
        return {"type": "http.request", "body": b"x" * 10, "more_body": bool(left)}

    return receive


async def answer(send, status=200):
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_a_body_in_time_is_read_whole():
    read = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            read.append(message["body"])
            if not message["more_body"]:
                break
        await asyncio.sleep(0.3)  # past the deadline, once the body is in: nothing cuts it
        await answer(send)

    sent = serve(app, chunks(0.05, 0.05, 0.05))
    assert read == [b"x" * 10] * 3 and sent[0]["status"] == 200


def test_a_read_waiting_past_the_deadline_is_cut_and_the_task_can_still_answer():
    seen = {}

    async def app(scope, receive, send):
        await receive()
        started = time.monotonic()
        try:
            await receive()  # the client sends nothing more
        except RequestTimeout as exc:
            seen["after"], seen["detail"] = time.monotonic() - started, str(exc)
        await asyncio.sleep(0.01)  # the cancellation that cut the read is spent
        if sys.version_info >= (3, 11):
            seen["cancelling"] = asyncio.current_task().cancelling()
        await answer(send, 408)

    sent = serve(app, chunks(0.0, 30.0), read_timeout_s=0.2)
    assert 0.15 < seen["after"] < 1.0 and "READ_TIMEOUT_S" in seen["detail"]
    assert seen.get("cancelling", 0) == 0
    assert sent[0]["status"] == 408


def test_a_read_asked_for_after_the_deadline_is_refused():
    seen = []

    async def app(scope, receive, send):
        await receive()
        await asyncio.sleep(0.3)  # the app dawdles between reads; the client's time runs on
        with pytest.raises(RequestTimeout):
            await receive()
        seen.append("refused")
        await answer(send, 408)

    sent = serve(app, chunks(0.0, 0.0, 0.0))
    assert seen == ["refused"] and sent[0]["status"] == 408


def test_a_cancellation_from_elsewhere_in_the_deadlines_own_step_still_stands():
    """The deadline's timer and another cancellation land together: the read ends with
    CancelledError (the other one's), not a 408 that would swallow it."""
    calls = []

    async def receive():
        calls.append(1)
        if len(calls) == 1:
            return {"type": "http.request", "body": b"x" * 10, "more_body": True}
        time.sleep(0.5)  # the loop is held: both timers below are due when it next looks
        await asyncio.sleep(30)

    async def app(scope, receive, send):
        await receive()
        asyncio.get_running_loop().call_later(0.3, asyncio.current_task().cancel)  # after the deadline's
        await receive()

    with pytest.raises(asyncio.CancelledError):
        serve(app, receive, read_timeout_s=0.2)


def test_a_cancellation_from_elsewhere_is_not_taken_for_the_deadline():
    async def app(scope, receive, send):
        await receive()
        asyncio.get_running_loop().call_later(0.05, asyncio.current_task().cancel)
        await receive()  # cancelled by someone else: CancelledError, not RequestTimeout

    with pytest.raises(asyncio.CancelledError):
        serve(app, chunks(0.0, 30.0), read_timeout_s=5)


def test_made_request_ids_are_32_hex_digits_unique_and_differ_in_a_forked_child():
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what a worker forked after start-up would make next
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    mine = new_request_id()
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode()
    os.waitpid(pid, 0)
    assert len(child) == 32 and child != mine
