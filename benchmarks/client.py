"""What the load generator sends, and how: request bodies and a minimal HTTP/1.1 client.

The images are :mod:`testbed.images`'s; ``multipart`` and
``base64_json`` wrap one image the way each server takes it, and ``Client``
sends prepared requests over keep-alive connections, one per concurrent
request. The client runs on the machine under test, so it is kept to the least
CPU per request: no header parsing beyond status, ``Content-Length``,
``Retry-After`` and ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import re
import socket
from dataclasses import dataclass
from typing import List, Optional, Tuple
from urllib.parse import urlparse

__all__ = [
    "Client",
    "Connection",
    "GrpcClient",
    "Payload",
    "base64_json",
    "multipart",
    "require_loopback",
    "v2_binary",
]

BOUNDARY = "chanseg-bench-boundary"


def require_loopback(url: str) -> None:
    """Raise unless ``url``'s host resolves to loopback addresses only."""
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ValueError(f"{url}: cannot resolve {host!r}") from exc
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(
            f"{url}: the load generator only talks to loopback addresses, not {sorted(addresses)}"
        )


@dataclass(frozen=True)
class Payload:
    """One request as bytes, built once: the client spends its CPU on sending."""

    body: bytes
    content_type: str
    headers: Tuple[Tuple[str, str], ...] = ()  # more request headers


def multipart(image: bytes, filename: str = "image.png") -> Payload:
    """``image`` as the single ``file`` part of a multipart/form-data body."""
    kind = "image/jpeg" if image[:3] == b"\xff\xd8\xff" else "image/png"
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {kind}\r\n\r\n"
    ).encode()
    return Payload(
        head + image + f"\r\n--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"
    )


def base64_json(image: bytes) -> Payload:
    """``image`` as ``{"image": "<base64>"}`` (how LitServe examples send images)."""
    import base64

    return Payload(json.dumps({"image": base64.b64encode(image).decode()}).encode(), "application/json")


def v2_binary(image: bytes) -> Payload:
    """``image``'s pixels as the v2 ``IMAGE`` input, ``UINT8 [1, H, W, 3]``, in the binary
    tensor data extension (a JSON header, then the raw bytes), asking for ``MASK`` in binary."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))[None]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "IMAGE",
                    "datatype": "UINT8",
                    "shape": list(pixels.shape),
                    "parameters": {"binary_data_size": pixels.nbytes},
                }
            ],
            "outputs": [{"name": "MASK", "parameters": {"binary_data": True}}],
        }  # fmt: skip
    ).encode()
    return Payload(
        header + pixels.tobytes(),
        "application/octet-stream",
        (("Inference-Header-Content-Length", str(len(header))),),
    )


class GrpcClient:
    """The same interface as :class:`Client` over gRPC (``GRPCInferenceService.ModelInfer``):
    a ``v2_binary`` payload becomes a ModelInferRequest with raw contents; one channel
    (HTTP/2 multiplexes the concurrent calls). Needs ``tritonclient[grpc]``."""

    def __init__(self, target: str, model_name: str, timeout_s: float) -> None:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self._pb, self._grpc = service_pb2, grpc
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.model_name, self.timeout_s = model_name, timeout_s

    def prepare(self, payload: Payload):
        length = int(dict(payload.headers)["Inference-Header-Content-Length"])
        header = json.loads(payload.body[:length])
        request = self._pb.ModelInferRequest(model_name=self.model_name)
        for tensor in header["inputs"]:
            request.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        for out in header.get("outputs", []):
            request.outputs.add(name=out["name"])
        request.raw_input_contents.append(payload.body[length:])
        return request

    async def send(self, request) -> Tuple[str, bool]:
        try:
            await self.stub.ModelInfer(request, timeout=self.timeout_s)
        except self._grpc.aio.AioRpcError as exc:
            code = exc.code()
            return ("503" if code == self._grpc.StatusCode.UNAVAILABLE else code.name), False
        return "200", False

    def close(self) -> None:
        """Nothing to do at once: the channel is closed by ``aclose`` (a coroutine)."""

    async def aclose(self) -> None:
        await self.channel.close()


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends prepared requests and reads
    ``Content-Length`` answers: the least client CPU per request (the client
    shares the machine with the server under test; httpx took ~1.4 ms of CPU
    per request here, this ~0.3 ms)."""

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = bytearray()
        self.waiter: Optional[asyncio.Future] = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._answer()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed before the answer"))

    def _answer(self) -> None:
        if self.waiter is None or self.waiter.done():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        length = _CONTENT_LENGTH.search(head)
        if length is None:  # every server here sends Content-Length; anything else is an error
            self.waiter.set_exception(ConnectionError("answer without Content-Length"))
            return
        total = end + 4 + int(length.group(1))
        if len(self.buffer) < total:
            return
        del self.buffer[:total]
        self.waiter.set_result(
            (int(head[9:12]), b"\r\nretry-after:" in head, b"\r\nconnection: close" in head)
        )

    async def exchange(self, request: bytes, timeout_s: float) -> Tuple[int, bool, bool]:
        """(status, has Retry-After, server closes) for one request."""
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await asyncio.wait_for(self.waiter, timeout_s)
        finally:
            self.waiter = None


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)")


class Client:
    """Keep-alive connections to one host; a connection per concurrent request."""

    def __init__(self, url: str, path: str, timeout_s: float) -> None:
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.path, self.timeout_s = path, timeout_s
        self.idle: List[Connection] = []
        self.all: List[Connection] = []

    def prepare(self, payload: Payload) -> bytes:
        extra = "".join(f"{name}: {value}\r\n" for name, value in payload.headers)
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{extra}"
            f"Content-Type: {payload.content_type}\r\nContent-Length: {len(payload.body)}\r\n\r\n"
        )
        return head.encode() + payload.body

    async def send(self, request: bytes) -> Tuple[str, bool]:
        conn = None
        while self.idle:
            candidate = self.idle.pop()
            if not candidate.closed:
                conn = candidate
                break
        try:
            if conn is None:
                loop = asyncio.get_running_loop()
                _, conn = await asyncio.wait_for(
                    loop.create_connection(Connection, self.host, self.port), self.timeout_s
                )
                self.all.append(conn)
            status, retry_after, closing = await conn.exchange(request, self.timeout_s)
        except (OSError, asyncio.TimeoutError):
            if conn is not None and conn.transport is not None:
                conn.transport.abort()
            return "error", False
        if closing:
            conn.transport.close()
        else:
            self.idle.append(conn)
        return str(status), retry_after

    def close(self) -> None:
        for conn in self.all:
            if conn.transport is not None:
                conn.transport.close()
