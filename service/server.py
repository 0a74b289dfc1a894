"""The HTTP server: uvicorn with the connection guards real traffic needs, and a drain phase.

uvicorn reads whatever a client sends for as long as it takes: a client that
sends its headers a byte a second, or 100 MB of them, holds a connection and
its memory for ever (measured: 100 MB of one header took the process to
216 MB). :class:`GuardedProtocol` is uvicorn's httptools protocol plus, per
connection:

- **header deadline**: a request's headers must arrive within
  ``READ_TIMEOUT_S`` of its first byte (408, connection closed); a new
  connection that sends nothing is closed after uvicorn's keep-alive timeout,
  as an idle keep-alive connection already is;
- **header size**: at most 64 KiB of request line and headers (431, closed);
- **malformed HTTP**: what the parser cannot read gets a JSON 400, like every
  other error (uvicorn's own is plain text);
- **open connections**: requests on connections beyond ``MAX_CONNECTIONS``
  are answered 503 with ``Retry-After`` by the middleware, and closed;
- **stalled readers**: a client that reads none of its response for
  ``READ_TIMEOUT_S`` is disconnected, so what the response holds is freed;
- **lingering close**: a connection closed while its request's body is still
  arriving (a 413 for a body over a limit, answered before it is read) is
  half-closed after the response and what else arrives is read and dropped
  (at most :data:`LINGER_S` and within the request's ``READ_TIMEOUT_S``, until
  :data:`LINGER_IDLE_S` pass without data, or :data:`LINGER_BYTES`), as nginx's
  ``lingering_close`` does: closed at once, the
  kernel resets the connection and a client still sending never reads the refusal;
- the time of each request's first byte, from which the middleware's body
  deadline counts (``scope["chanseg.connection"]``).

:class:`DrainingServer` keeps one shutdown budget: from SIGTERM to the end of
the process, at most ``DRAIN_TIMEOUT_S`` (plus the interpreter's exit). It
drains accepted work, hands uvicorn what is left for open connections, then
the lifespan what is left for the batcher; a thread still busy at the end
(a stuck batch) does not keep the process alive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .middleware import CONNECTION_SCOPE_KEY

__all__ = [
    "Guards",
    "GuardedProtocol",
    "DrainingServer",
    "protocol_class",
    "MAX_HEADER_BYTES",
    "EXIT_MARGIN_S",
]

log = logging.getLogger("chanseg.server")
access_log = logging.getLogger("chanseg.access")

MAX_HEADER_BYTES = 64 * 1024
JOINED_BYTES = 64 * 1024  # a write held to go out with the next one (_LingeringTransport): at most this
LINGER_S, LINGER_IDLE_S, LINGER_BYTES = (
    30.0,
    5.0,
    1 << 30,
)  # nginx: lingering_time 30 s, lingering_timeout 5 s
# From the end of the shutdown budget to the process being gone (the interpreter's
# exit): what a grace period must allow beyond DRAIN_TIMEOUT_S. Measured < 1 s
# with a batch that never returns (tests/service/test_watchdog.py).
EXIT_MARGIN_S = 1.5


@dataclass(frozen=True)
class Guards:
    read_timeout_s: float
    max_connections: int
    max_header_bytes: int = MAX_HEADER_BYTES
    on_refused: Optional[Callable[[str, int], None]] = None  # (reason, status or 0) -> None


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the guards above; see :func:`protocol_class`."""

    guards: ClassVar[Guards] = Guards(read_timeout_s=60.0, max_connections=256)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_body = False  # the request's body is still arriving
        self._lingering: Optional[_LingeringTransport] = None
        self._linger_timers: list = []
        self._linger_bytes = 0
        self._timer: Optional[asyncio.TimerHandle] = None  # idle or header deadline
        self._stall_timer: Optional[asyncio.TimerHandle] = None
        self._header_bytes = 0
        self._first_byte = 0.0
        self._in_headers = False
        self._over_capacity = False
        self._refused = False
        # Settled when the connection is lost: every request of it learns its client is gone
        # (scope[CONNECTION_SCOPE_KEY]["lost"]). uvicorn makes a protocol per connection.
        self._lost: asyncio.Future = self.loop.create_future()

    # -- connection ------------------------------------------------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))
        self._over_capacity = len(self.connections) > self.guards.max_connections
        self._arm(self.timeout_keep_alive, self._idle)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self._lost.done():
            self._lost.set_result(None)
        self._disarm()
        for timer in self._linger_timers:
            timer.cancel()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_BYTES:
                self._lingering.hard_close()
            else:
                self._linger_timers[1].cancel()
                self._linger_timers[1] = self.loop.call_later(LINGER_IDLE_S, self._lingering.hard_close)
            return
        if self._refused:
            return
        super().data_received(data)

    def eof_received(self) -> None:
        # uvloop closes the transport itself after this (uvicorn returns None), past the
        # wrapper's close: a response still held for the end of this step goes out first.
        if isinstance(self.transport, _LingeringTransport):
            self.transport._flush()
        return super().eof_received()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.guards.read_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    # -- parser callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._first_byte = time.monotonic()
        self._header_bytes = 0
        self._in_headers = True
        self._arm(self.guards.read_timeout_s, self._header_timeout)

    def on_url(self, url: bytes) -> None:
        if self._count(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._count(len(name) + len(value) + 4):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_headers = False
        self._in_body = True
        self._disarm()
        self.scope[CONNECTION_SCOPE_KEY] = {  # type: ignore[literal-required]
            "first_byte": self._first_byte,
            "over_capacity": self._over_capacity,
            "lost": self._lost,
        }
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        # uvicorn appends each chunk to a bytearray that its receive() then copies into
        # bytes: two copies of the body on the event loop (~120 KB per request in the
        # benchmark, which arrives as one chunk per receive). A chunk that finds nothing
        # pending goes on as the bytes it is (``b"" + chunk`` is ``chunk``, and so is
        # ``bytes(chunk)``); a second one before the app has read the first is appended
        # to a bytearray from there, as uvicorn does. Where uvicorn drops the chunk (no
        # request cycle: an upgrade; a response already sent) it is left to uvicorn.
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not self.parser.should_upgrade():
            pending = cycle.body
            if not pending:
                cycle.body = b""
            elif type(pending) is bytes:
                cycle.body = bytearray(pending)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        if not self._refused:
            super().on_message_complete()

    def linger(self) -> bool:
        """Close by half-closing and dropping what still arrives (module docstring), when the
        request's body is still arriving; False when a plain close will do."""
        transport = self._lingering_candidate()
        if transport is None:
            return False
        # Within the request's own deadline: a client too slow for it (a 408) is not waited for.
        left = min(LINGER_S, self._first_byte + self.guards.read_timeout_s - time.monotonic())
        if left <= 0:
            return False
        self._lingering = transport
        transport.inner.write_eof()  # the response, then FIN; the reading side stays open
        transport.inner.resume_reading()
        self._linger_timers = [
            self.loop.call_later(left, transport.hard_close),
            self.loop.call_later(min(left, LINGER_IDLE_S), transport.hard_close),
        ]
        return True

    def _lingering_candidate(self) -> Optional["_LingeringTransport"]:
        transport = self.transport
        if (
            not self._in_body
            or not isinstance(transport, _LingeringTransport)
            or transport.inner.is_closing()
        ):
            return None
        return transport if transport.inner.can_write_eof() else None

    # -- guards ----------------------------------------------------------------

    def _count(self, nbytes: int) -> bool:
        if self._refused:
            return False
        self._header_bytes += nbytes
        if self._header_bytes > self.guards.max_header_bytes:
            self._refuse(
                431, "header_too_large",
                f"request line and headers over {self.guards.max_header_bytes} bytes",
            )  # fmt: skip
            return False
        return True

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle(self) -> None:
        self._timer = None
        if self.cycle is None and not self._in_headers and not self.transport.is_closing():
            self._report("idle", 0)
            self.transport.close()

    def _header_timeout(self) -> None:
        self._timer = None
        if self._in_headers and not self._refused:
            self._refuse(
                408, "header_timeout",
                f"the request's headers did not arrive within {self.guards.read_timeout_s:g} s (READ_TIMEOUT_S)",
            )  # fmt: skip

    def _stalled(self) -> None:
        self._stall_timer = None
        if not self.transport.is_closing():
            self._report("write_stalled", 0)
            log.info(
                "client stopped reading its response for %g s (READ_TIMEOUT_S): connection aborted",
                self.guards.read_timeout_s,
                extra={"client": f"{self.client[0]}:{self.client[1]}" if self.client else "-"},
            )
            self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to bytes its parser cannot read (it has logged a warning).
        self._refuse(400, "invalid_http", f"invalid HTTP request ({msg.rstrip('.')})")

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        """Answer ``status`` with a JSON error at the connection level, then close it."""
        self._refused = True
        self._disarm()
        key = (
            "error" if bytes(getattr(self, "url", b"") or b"").startswith(b"/v2") else "detail"
        )  # as errors.py
        body = json.dumps({key: detail}).encode()
        head = b"".join(
            [
                STATUS_LINE[status],
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n\r\n",
            ]
        )
        if not self.transport.is_closing():
            self.transport.write(head + body)
            self.transport.close()
        self._report(reason, status)

    def _report(self, reason: str, status: int) -> None:
        if status:
            access_log.info("- - %d", status, extra={"status": status, "endpoint": "other", "reason": reason})
        if self.guards.on_refused is not None:
            self.guards.on_refused(reason, status)


class _LingeringTransport:
    """A connection's transport whose ``close`` lingers while a request body is still
    arriving (:meth:`GuardedProtocol.linger`), and whose writes made in one step of the
    event loop leave as one; everything else is the transport's own.

    uvicorn writes a response's head and its body separately, and uvloop sends each
    write at once: two syscalls and, on TCP, two segments per response, both on the
    event loop. So a write of up to :data:`JOINED_BYTES` is held until the next write,
    which takes it along, or the end of this step of the loop (``call_soon``), whichever
    comes first; ``close`` sends it first, ``abort`` drops it. One syscall and one segment
    per response now; on loopback the loop's CPU hardly moved, since a write's cost there
    is mostly delivering it into the client's socket (docs/performance.md)."""

    def __init__(self, inner: asyncio.Transport, protocol: GuardedProtocol) -> None:
        self.inner, self._protocol, self._lingering = inner, protocol, False
        self._held: Optional[bytes] = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= JOINED_BYTES:
                self.inner.write(held + data)
                return
            self.inner.write(held)
        elif len(data) <= JOINED_BYTES and not self.inner.is_closing():
            self._held = bytes(data)  # the caller's buffer may change once this returns
            self._protocol.loop.call_soon(self._flush)
            return
        self.inner.write(data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self.inner.is_closing():
            self.inner.write(held)

    def is_closing(self) -> bool:
        return self._lingering or self.inner.is_closing()

    def close(self) -> None:
        if self._lingering:
            return
        self._flush()
        self._lingering = self._protocol.linger()
        if not self._lingering:
            self.inner.close()

    def hard_close(self) -> None:
        if not self.inner.is_closing():
            self.inner.close()


def protocol_class(read_timeout_s: float, max_connections: int, metrics: Any = None) -> type:
    """A :class:`GuardedProtocol` subclass with these limits, counting what it refuses on ``metrics``."""

    def on_refused(reason: str, status: int) -> None:
        if metrics is not None:
            metrics.connections_refused.labels(reason).inc()
            if status:
                metrics.requests.labels("other", str(status)).inc()

    guards = Guards(read_timeout_s=read_timeout_s, max_connections=max_connections, on_refused=on_refused)
    return type("ChansegProtocol", (GuardedProtocol,), {"guards": guards})


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain phase between the signal and the stop, inside one shutdown budget."""

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.state = state
        self._drain_task: Optional[asyncio.Task] = None
        self._reload_task: Optional[asyncio.Task] = None
        state.exit_hook = self.request_exit
        signal.signal(signal.SIGHUP, self.handle_hangup)

    def handle_hangup(self, sig, frame) -> None:
        """SIGHUP: load ``MODEL_PATH`` again and swap it in (``service.repository``; off
        unless ``MODEL_REPOSITORY`` is set). One at a time; ignored while draining."""
        if not self.state.ready or self.state.draining:
            return
        if self._reload_task is not None and not self._reload_task.done():
            log.warning("SIGHUP ignored: a reload is in progress")
            return
        self._reload_task = asyncio.get_event_loop().create_task(self.state.repository.reload())

    def request_exit(self) -> None:
        """Stop serving, from any thread (after the device was lost: the exit status is 1).
        uvicorn's main loop polls ``should_exit`` every 0.1 s."""
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        if self._drain_task is not None or not self.state.ready:
            return super().handle_exit(sig, frame)  # second signal, or still starting: stop now
        self.state.start_draining(self.state.settings.drain_timeout_s)
        self._drain_task = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        state, batcher = self.state, self.state.batcher
        # Kept back for uvicorn's own shutdown steps and the lifespan's.
        reserve = min(1.0, state.settings.drain_timeout_s / 4)
        while batcher is not None and batcher.depth > 0 and state.shutdown_remaining() > reserve:
            await asyncio.sleep(0.05)
        await asyncio.sleep(min(0.2, max(0.0, state.shutdown_remaining() - reserve)))  # last responses out
        self.config.timeout_graceful_shutdown = max(0.1, state.shutdown_remaining() - reserve / 2)
        self.should_exit = True
