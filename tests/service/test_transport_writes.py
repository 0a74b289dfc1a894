"""The connection's transport (service/server.py): writes made in one step of the event
loop leave as one, in order, and none is lost or held past that step."""

from __future__ import annotations

import asyncio

from service.server import JOINED_BYTES, _LingeringTransport


class Inner:  # what uvloop's transport is asked to do
    def __init__(self) -> None:
        self.writes, self.closed, self.aborted = [], False, False

    def write(self, data) -> None:
        assert not self.closed, "a write after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def can_write_eof(self) -> bool:
        return False


class Protocol:
    def __init__(self, loop) -> None:
        self.loop = loop

    def linger(self) -> bool:  # a plain close (GuardedProtocol.linger when no body is arriving)
        return False


def steps(*actions):
    """Run each action in its own step of a real event loop; what the inner transport got
    after each step."""

    async def main():
        inner = Inner()
        transport = _LingeringTransport(inner, Protocol(asyncio.get_running_loop()))
        seen = []
        for action in actions:
            action(transport)
            await asyncio.sleep(0)  # the end of this step: call_soon callbacks run
            seen.append(list(inner.writes))
        return inner, seen

    return asyncio.run(main())


def test_a_head_and_its_body_leave_as_one_write():
    inner, seen = steps(lambda t: (t.write(b"HTTP/1.1 200 OK\r\n\r\n"), t.write(b"body")))
    assert seen == [[b"HTTP/1.1 200 OK\r\n\r\nbody"]]


def test_a_lone_write_leaves_at_the_end_of_its_step():
    # HEAD: uvicorn writes the head and no body
    inner, seen = steps(lambda t: t.write(b"head"), lambda t: t.write(b"next"))
    assert seen == [[b"head"], [b"head", b"next"]]


def test_a_large_write_goes_after_the_held_one_uncopied_and_in_order():
    big = bytearray(JOINED_BYTES + 1)
    inner, seen = steps(lambda t: (t.write(b"head"), t.write(big)))
    assert seen == [[b"head", bytes(big)]]
    inner, seen = steps(lambda t: (t.write(big), t.write(b"tail")))
    assert seen == [[bytes(big), b"tail"]]


def test_a_held_write_is_a_copy_of_the_callers_buffer():
    buffer = bytearray(b"head")

    def write_then_reuse(t):
        t.write(buffer)
        buffer[:] = b"XXXX"

    inner, seen = steps(write_then_reuse)
    assert seen == [[b"head"]]


def test_close_sends_what_is_held_first_and_abort_drops_it():
    inner, seen = steps(lambda t: (t.write(b"bye"), t.close()))
    assert inner.writes == [b"bye"] and inner.closed and not inner.aborted
    inner, seen = steps(lambda t: (t.write(b"lost"), t.abort()))
    assert inner.writes == [] and inner.aborted
