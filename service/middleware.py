"""ASGI middleware: request id, upload limit while reading, metrics and access log.

Pure ASGI (not BaseHTTPMiddleware) so that the body limit applies while the
body streams in: a ``Content-Length`` over the limit is refused before reading,
and a chunked body is cut off at the first byte over it.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import PayloadTooLarge, error_body
from .metrics import Metrics

__all__ = ["RequestMiddleware"]

access_log = logging.getLogger("chanseg.access")
error_log = logging.getLogger("chanseg.errors")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_upload_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex
        # Per-request values for the routes and the access log. Not scope["state"]:
        # that dict is shared with the lifespan state by some servers.
        scope["chanseg"] = {"request_id": request_id, "started": time.monotonic()}
        status = {"code": 500, "started": False}
        limit = self.max_upload_bytes

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                total_ms = (time.perf_counter() - started) * 1000
                extra = [
                    (b"x-request-id", request_id.encode()),
                    (b"x-total-time-ms", f"{total_ms:.1f}".encode()),
                ]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        received = 0

        async def receive_wrapper() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body over the limit of {limit} bytes")
            return message

        declared = headers.get("content-length", "")
        try:
            if declared.isdigit() and int(declared) > limit:
                await self._refuse(
                    send_wrapper, 413, f"request body of {declared} bytes is over the limit of {limit}"
                )
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except Exception as exc:  # the catch-all: one log line, no internals to the client
            error_log.error("unhandled error (request id %s)", request_id, exc_info=exc)
            if not status["started"]:
                await self._refuse(send_wrapper, 500, "internal server error", scope.get("path", ""))
        finally:
            self._observe(scope, request_id, status["code"], started)

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str, path: str = "") -> None:
        body = json.dumps(error_body(path, detail)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _observe(self, scope: Scope, request_id: str, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        route = scope.get("route")
        endpoint = getattr(route, "name", None) or "other"
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.request_duration.labels(endpoint).observe(elapsed)
        state = scope.get("chanseg", {})
        if endpoint in ("metrics", "healthz", "readyz") and status < 400:
            return  # probes and scrapes would drown the access log
        access_log.info(
            "%s %s %d",
            scope.get("method", "-"),
            getattr(route, "path", scope.get("path", "-")),
            status,
            extra={
                "request_id": request_id,
                "status": status,
                "endpoint": endpoint,
                "images": state.get("images", 0),
                "queue_ms": round(state.get("queue_ms", 0.0), 1),
                "inference_ms": round(state.get("inference_ms", 0.0), 1),
                "total_ms": round(elapsed * 1000, 1),
            },
        )
