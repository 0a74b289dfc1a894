"""ASGI middleware: the request's context, the request body's memory and deadline, metrics
and access log.

Pure ASGI (not BaseHTTPMiddleware) so that the body is governed while it
streams in:

- a ``Content-Length`` over ``MAX_UPLOAD_BYTES`` is refused before reading,
  and a chunked body is cut off at the first byte over it (413);
- the first time the app reads the body, twice its declared size (a body is
  held as chunks, then joined) is reserved from the ``body`` ledger of the
  memory budget, waiting its turn (503 if no room comes before the request's
  deadline); requests that never read their body never wait;
- the headers and body must arrive within ``READ_TIMEOUT_S`` of the request's
  first byte (408, and the connection is closed);
- a client that hangs up mid-body ends the request as 499, logged at INFO
  like any other status, never as an error;
- a response sent before a large body was read (over 1 MiB left, or a chunked
  body) closes the connection, so the rest cannot hold it; a small remainder
  is read and dropped by uvicorn and the connection stays open (closing a
  socket with unread data makes the kernel reset it, and the client may then
  never see its answer: measured as lost 503s under overload);
- every reservation the request made is released once its response has been sent.

Each request gets its :class:`~service.context.RequestContext` in ``scope["chanseg"]``
(id, start and deadline, reservations, how to learn the client went away), which the
routes pass down (``deps.Context``).

The connection-level guards (header deadline, open-connection bound, stalled
readers) are in :mod:`service.server`; it marks requests that arrive over the
connection bound, and this middleware answers them with 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .budget import MemoryBudget
from .context import RequestContext, new_request_id
from .errors import ClientGone, Overloaded, PayloadTooLarge, RequestTimeout, error_body
from .metrics import Metrics

__all__ = ["RequestMiddleware", "CONNECTION_SCOPE_KEY", "SAFE_REQUEST_ID"]

access_log = logging.getLogger("chanseg.access")
error_log = logging.getLogger("chanseg.errors")
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_DRAINED_REMAINDER = 1 << 20  # an unread remainder up to this is drained, not a reason to close
_LOGGED_PATH = 200  # characters of an unmatched path in the access log
# What service.server's protocol tells about the connection: when the request's
# first byte arrived, whether the connection is over MAX_CONNECTIONS, and a future
# settled once it is lost (the client gone: RequestContext.gone).
CONNECTION_SCOPE_KEY = "chanseg.connection"


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_upload_bytes: int,
        body_budget: Optional[MemoryBudget] = None,
        read_timeout_s: float = 60.0,
        request_timeout_s: float = 30.0,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_upload_bytes = max_upload_bytes
        self.body_budget = body_budget
        self.read_timeout_s = read_timeout_s
        self.request_timeout_s = request_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        connection = scope.get(CONNECTION_SCOPE_KEY) or {}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if SAFE_REQUEST_ID.fullmatch(given) else new_request_id()
        status = {"code": 500, "started": False}
        limit = self.max_upload_bytes
        declared = headers.get("content-length", "")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        has_body = chunked or (declared.isdigit() and int(declared) > 0)
        body: dict = {"received": 0, "done": not has_body, "reader": None, "expired": False}
        body["deadline"] = connection.get("first_byte", time.monotonic()) + self.read_timeout_s

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                total_ms = (time.perf_counter() - started) * 1000
                extra = [
                    (b"x-request-id", request_id.encode()),
                    (b"x-total-time-ms", f"{total_ms:.1f}".encode()),
                ]
                left = int(declared) - body["received"] if declared.isdigit() else None
                if not body["done"] and (left is None or left > _DRAINED_REMAINDER):
                    extra.append((b"connection", b"close"))  # the rest of the body would hold it
                message["headers"] = list(message.get("headers", [])) + extra
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                context.finish(status["code"] < 400)  # before the client can read it: its statistics count it
            await send(message)

        async def reserve_body() -> None:
            nbytes = 2 * (limit if chunked else int(declared))
            waited = time.monotonic()
            try:
                body["lease"] = await self.body_budget.reserve(nbytes, timeout=self.request_timeout_s)
                context.hold(body["lease"])
            except asyncio.TimeoutError:
                raise Overloaded("server busy: no memory free for request bodies; retry later") from None
            body["deadline"] += time.monotonic() - waited  # our wait is not the client's slowness

        def too_slow() -> RequestTimeout:
            return RequestTimeout(
                f"the request did not arrive within {self.read_timeout_s:g} s (READ_TIMEOUT_S); "
                "send it faster or in smaller pieces"
            )

        def expire() -> None:  # the body's deadline: a read waiting now is cancelled
            body["expired"] = True
            if body["reader"] is not None:
                body["reader"].cancel()

        async def receive_wrapper() -> Message:
            if body["done"]:
                return await receive()
            if self.body_budget is not None and "lease" not in body:
                await reserve_body()
            if body["expired"] or time.monotonic() >= body["deadline"]:
                raise too_slow()
            if "timer" not in body:  # one timer for the whole body, not one (and a task) per read
                loop = asyncio.get_running_loop()
                body["timer"] = loop.call_at(loop.time() + body["deadline"] - time.monotonic(), expire)
            body["reader"] = task = asyncio.current_task()
            before = task.cancelling() if hasattr(task, "cancelling") else 0  # Python 3.11+
            try:
                message = await receive()
            except asyncio.CancelledError:
                if not body["expired"]:
                    raise
                # Ours, and spent; if someone else cancelled the task as well, theirs stands.
                if hasattr(task, "uncancel") and task.uncancel() > before:
                    raise
                raise too_slow() from None
            finally:
                body["reader"] = None
            if message["type"] == "http.disconnect":
                raise ClientGone("client disconnected while sending its request")
            if message["type"] == "http.request":
                body["received"] += len(message.get("body", b""))
                if body["received"] > limit:
                    raise PayloadTooLarge(f"request body over the limit of {limit} bytes")
                if not message.get("more_body", False):
                    body["done"] = True
                    body["timer"].cancel()
                    if chunked and "lease" in body:
                        body["lease"].shrink(2 * body["received"])
            return message

        async def wait_gone() -> None:  # the body has been read by the time anyone waits
            while (await receive_wrapper())["type"] != "http.disconnect":
                pass

        # Not scope["state"]: that dict is shared with the lifespan state by some servers.
        context = scope["chanseg"] = RequestContext(
            request_id,
            self.request_timeout_s,
            wait_gone=wait_gone,
            gone=connection.get("lost"),
            id_given=request_id == given,
        )
        try:
            if connection.get("over_capacity"):
                await self._refuse(
                    send_wrapper, 503, "server busy: too many open connections (MAX_CONNECTIONS); retry later",
                    scope.get("path", ""), [(b"retry-after", b"1"), (b"connection", b"close")],
                )  # fmt: skip
            elif declared.isdigit() and int(declared) > limit:
                await self._refuse(
                    send_wrapper, 413, f"request body of {declared} bytes is over the limit of {limit}",
                    scope.get("path", ""),
                )  # fmt: skip
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except Exception as exc:  # the catch-all: one log line, no internals to the client
            error_log.error("unhandled error (request id %s)", request_id, exc_info=exc)
            if not status["started"]:
                await self._refuse(send_wrapper, 500, "internal server error", scope.get("path", ""))
        finally:
            if "timer" in body:
                body["timer"].cancel()
            context.release()
            context.finish(status["code"] < 400)
            self._observe(scope, context, status["code"], started)

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str, path: str = "", headers: list = ()) -> None:
        body = json.dumps(error_body(path, detail)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _observe(self, scope: Scope, context: RequestContext, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        route = scope.get("route")
        endpoint = getattr(route, "name", None) or "other"
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.request_duration.labels(endpoint).observe(elapsed)
        if endpoint in ("metrics", "healthz", "readyz") and status < 400:
            return  # probes and scrapes would drown the access log
        path = getattr(route, "path", None) or scope.get("path", "-")  # a route's template, or what was asked
        access_log.info(
            "%s %s %d",
            scope.get("method", "-"),
            path if len(path) <= _LOGGED_PATH else path[:_LOGGED_PATH] + "...",
            status,
            extra={
                "request_id": context.request_id,
                "status": status,
                "endpoint": endpoint,
                "images": context.images,
                "queue_ms": round(context.queue_ms, 1),
                "inference_ms": round(context.inference_ms, 1),
                "total_ms": round(elapsed * 1000, 1),
            },
        )
