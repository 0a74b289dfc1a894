"""A request's body on its way from the socket to the app (service/server.py's
``GuardedProtocol.on_body``): whatever the chunks and whenever the app reads them, it gets
every byte once, in order, as bytes; a chunk the app reads on its own is handed on without a copy."""

from __future__ import annotations

import asyncio
from typing import List

import pytest
from httptools import HttpParserUpgrade
from uvicorn.config import Config
from uvicorn.server import ServerState

from service.server import protocol_class


class Transport:  # what uvloop's transport is asked to do
    def __init__(self) -> None:
        self.written, self.closed, self.reading = bytearray(), False, True

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return False

    def set_write_buffer_limits(self, *args, **kwargs) -> None:
        pass


def serve(chunks: List[bytes], reads_between: bool):
    """Feed a POST whose body is ``chunks`` to a GuardedProtocol, one ``data_received`` per
    chunk, letting the app read between them or not; what each ``receive()`` gave the app."""
    body = b"".join(chunks)
    head = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body)
    messages: list = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            messages.append(message)
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        config = Config(app=app, lifespan="off", log_level="warning")
        config.load()
        protocol = protocol_class(60.0, 10)(config=config, server_state=ServerState(), app_state={})
        transport = Transport()
        protocol.connection_made(transport)
        protocol.data_received(head)
        for chunk in chunks:
            protocol.data_received(chunk)
            if reads_between:
                for _ in range(5):
                    await asyncio.sleep(0)
        for _ in range(20):
            await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport

    transport = asyncio.run(main())
    assert transport.written.startswith(b"HTTP/1.1 200 OK") and transport.written.endswith(b"ok")
    return messages


CHUNKINGS = [
    [b"a" * 120_000],
    [b"a" * 70_000, b"b" * 50_000],
    [b"ab", b"", b"cd", b"e" * 100_000, b"f"],
]


@pytest.mark.parametrize("chunks", CHUNKINGS, ids=["one", "two", "five"])
@pytest.mark.parametrize("reads_between", [True, False], ids=["read-each", "read-later"])
def test_every_chunking_reaches_the_app_whole_and_as_bytes(chunks, reads_between):
    messages = serve(chunks, reads_between)
    assert all(type(m["body"]) is bytes for m in messages)
    assert b"".join(m["body"] for m in messages) == b"".join(chunks)
    assert [m["more_body"] for m in messages][-1] is False


def test_a_chunk_the_app_reads_on_its_own_is_not_copied(monkeypatch):
    # The chunk httptools hands on_body is the very object the app receives.
    from uvicorn.protocols.http import httptools_impl

    seen: list = []
    on_body = httptools_impl.HttpToolsProtocol.on_body

    def spy(self, body):
        seen.append(body)
        return on_body(self, body)

    monkeypatch.setattr(httptools_impl.HttpToolsProtocol, "on_body", spy)
    messages = serve([b"a" * 120_000], reads_between=True)
    bodies = [m["body"] for m in messages if m["body"]]
    assert len(seen) == 1 and len(bodies) == 1 and bodies[0] is seen[0]


def test_a_body_with_no_request_cycle_is_left_to_uvicorn():
    # An upgrade request (WebSocket) has no cycle, and uvicorn drops a body that comes with it.
    # httptools 0.9 stops before such a body (below), but a parser that hands it on must find
    # it dropped, not an AttributeError that the parser would turn into a 400 for the handshake.
    async def main():
        config = Config(app=lambda *args: None, lifespan="off", log_level="warning")
        config.load()
        protocol = protocol_class(60.0, 10)(config=config, server_state=ServerState(), app_state={})
        protocol.connection_made(Transport())
        assert protocol.cycle is None
        request = b"POST / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\ncontent-length: 1\r\n\r\nA"
        with pytest.raises(HttpParserUpgrade):  # the parser stops for uvicorn's upgrade
            protocol.parser.feed_data(request)
        assert protocol.cycle is None
        protocol.on_body(b"A")
        assert protocol.cycle is None
        protocol.connection_lost(None)

    asyncio.run(main())
