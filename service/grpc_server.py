"""The Open Inference Protocol over gRPC: the ``GRPCInferenceService`` that
``tritonclient.grpc`` speaks (server live/ready/metadata, model ready/metadata, infer
with raw or typed contents), on its own port (``GRPC_PORT``), in the same process and
event loop as the HTTP server.

A thin servicer: each call decodes its message (:mod:`service.grpc_codec`), calls the
data plane the HTTP endpoints call too (:mod:`service.dataplane`) with the call's
:class:`~service.context.RequestContext`, and encodes what it returns. So it shares
everything behind the HTTP routes: the batcher, the limits, the memory budget, the API
key (metadata ``authorization: Bearer KEY`` or ``x-api-key``), the metrics (endpoint
``grpc_<method>``) and the drain (new calls ``UNAVAILABLE``; the server stops within
the shutdown budget). An error is answered with its class's ``grpc_code``
(:mod:`service.errors`: malformed ``INVALID_ARGUMENT``, too large ``RESOURCE_EXHAUSTED``,
overload and draining ``UNAVAILABLE``, ...); a call chanseg does not implement gets
``UNIMPLEMENTED``, naming it. Adding a call: a method here and an entry in ``handler``.

A call is guarded like an HTTP request, before its message is read:

- **the key first**: :class:`ApiKeyInterceptor` checks the call's metadata before
  grpc reads the message; a call without the key is refused with nothing read (every
  method is registered as taking a stream of raw bytes, which grpc reads only when
  asked: a unary handler would receive and parse the message first); only the calls
  that read no message are open (``ServerLive``, ``ServerReady``, ``ServerMetadata``):
  ``ModelReady``, open over HTTP, reads its name over gRPC, and an open read would let
  anyone hold the memory budget, so it takes the key; the model-repository calls
  (:mod:`service.grpc_repository`) take the admin key (``ADMIN_API_KEY``, else ``API_KEY``),
  as their HTTP routes do;
- **the memory budget**: reading a message reserves twice ``MAX_UPLOAD_BYTES`` (the
  message, then its copy in Python) from the ``body`` ledger, as a chunked HTTP body
  does, shrunk to twice the message once it is read, held until the call ends; the
  message limit (``grpc.max_receive_message_length``) is ``MAX_UPLOAD_BYTES``, which
  follows ``MEMORY_BUDGET_MB``; a message must arrive within ``READ_TIMEOUT_S``;
- **nothing heavy on the event loop**: the infer message is decoded on the I/O pool
  by :mod:`service.grpc_codec` (its fields counted and capped before anything is
  converted), and the response written there;
- **the request id** is the call's ``x-request-id`` metadata, else the message's
  ``id``, either only when it is a safe id (as HTTP's ``X-Request-ID``), else a new one;
  the message's ``id`` is still echoed in the response, as the protocol asks.

The service definitions come from ``tritonclient[grpc]`` (its generated
``service_pb2``): the ``grpc`` extra.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Dict

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from . import dataplane
from .context import RequestContext, new_request_id
from .deps import check_admin, check_api_key, check_ready, check_room
from .errors import (
    ApiError,
    Forbidden,
    InvalidRequest,
    NotImplementedCall,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    VersionNotLoaded,
)
from .grpc_codec import decode_infer_request, encode_infer_response
from .grpc_repository import ADMIN_METHODS, repository_calls
from .middleware import SAFE_REQUEST_ID
from .pipeline import pool_call, reserve_output
from .v2_codec import V2Error, V2TooLarge

log = logging.getLogger("chanseg.grpc")

__all__ = ["start_grpc_server", "ApiKeyInterceptor", "OPEN_METHODS"]

SERVICE = "inference.GRPCInferenceService"
# Callable without the key: health and server metadata, which read no message.
OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})
# The calls whose request holds names and versions only: a larger message is refused unparsed.
SMALL_MESSAGE = 64 << 10
# Labels of chanseg_requests_total{endpoint}: bounded, whatever method a client names.
_ENDPOINTS = {"ModelInfer": "infer", "ModelMetadata": "model_metadata", "ModelReady": "model_ready"}


def _endpoint(method: str) -> str:
    return "grpc_" + _ENDPOINTS.get(method, "other")


def _count(state, method: str, status: int, started: float) -> None:
    """The call in chanseg_requests_total{status}, with the HTTP status of what it ended with."""
    metrics = state.metrics
    metrics.requests.labels(_endpoint(method), str(status)).inc()
    metrics.request_duration.labels(_endpoint(method)).observe(time.perf_counter() - started)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """The API key, checked from the call's metadata before its message is read: a call
    without it gets ``UNAUTHENTICATED`` and grpc never receives its message."""

    def __init__(self, state) -> None:
        self.state = state

    async def intercept_service(self, continuation, details):
        method = details.method.rpartition("/")[2]
        if method not in OPEN_METHODS:
            check = check_admin if method in ADMIN_METHODS else check_api_key  # the repository: the admin key
            try:
                check(self.state, dict(details.invocation_metadata or ()))
            except (Unauthorized, Forbidden) as exc:
                return self._refusal(method, exc)
        return await continuation(details)

    def _refusal(self, method: str, exc: ApiError) -> grpc.RpcMethodHandler:
        started, state = time.perf_counter(), self.state

        async def refuse(requests, context) -> None:
            _count(state, method, exc.status, started)
            await context.abort(grpc.StatusCode[exc.grpc_code], exc.detail)

        return grpc.stream_unary_rpc_method_handler(refuse)  # reads nothing


def _request_context(state, rpc: grpc.aio.ServicerContext, metadata: Dict[str, Any]) -> RequestContext:
    """The call's :class:`RequestContext`: its id from ``x-request-id`` when that is a safe
    id; released, and the client known gone, when the call ends."""
    given = metadata.get("x-request-id", "")
    safe = isinstance(given, str) and SAFE_REQUEST_ID.fullmatch(given) is not None
    ended = asyncio.Event()
    context = RequestContext(
        given if safe else new_request_id(),
        state.settings.request_timeout_s,
        wait_gone=ended.wait,
        id_given=safe,
    )

    def done(_rpc) -> None:
        ended.set()
        context.release()  # its response is sent, or it never will be

    rpc.add_done_callback(done)
    return context


class InferenceService:
    """The service's calls, each registered as taking raw request bytes (see the module
    docstring): ``handler()`` is the generic handler grpc serves. Each call reads its
    message, decodes it (:mod:`service.grpc_codec` for infer), calls the data plane
    (:mod:`service.dataplane`, as the HTTP endpoints do) and encodes its answer."""

    def __init__(self, state) -> None:
        self.state = state

    def handler(self) -> grpc.GenericRpcHandler:
        calls: Dict[str, Callable[..., Awaitable[bytes]]] = {
            "ServerLive": self._server_live,
            "ServerReady": self._server_ready,
            "ServerMetadata": self._server_metadata,
            "ModelReady": self._model_ready,
            "ModelMetadata": self._model_metadata,
            "ModelInfer": self._infer,
            "ModelConfig": self._model_config,
            "ModelStatistics": self._model_statistics,
            **repository_calls(self),
        }
        for kind in ("System", "Cuda"):
            for what in ("Status", "Register", "Unregister"):
                calls[f"{kind}SharedMemory{what}"] = self._shared_memory
        methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
        handlers = {
            m.name: grpc.stream_unary_rpc_method_handler(
                self._handled(m.name, calls.get(m.name, self._unimplemented))
            )
            for m in methods
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _handled(self, method: str, fn) -> Callable:
        """A behaviour for grpc: ``fn(rpc, context, method)``, its ApiError answered with the
        error's gRPC code, the call counted in the metrics (not ``ServerLive``/``ServerReady``,
        which probes call every few seconds; HTTP's probes are counted, only not logged)."""
        state = self.state

        async def behavior(requests, rpc) -> bytes:
            started, status = time.perf_counter(), 200
            metadata = dict(rpc.invocation_metadata() or ())
            context = _request_context(state, rpc, metadata)
            try:
                with state.tracing.server_span(method, metadata):
                    return await fn(rpc, context, method)
            except ApiError as exc:
                status = exc.status
                await rpc.abort(grpc.StatusCode[exc.grpc_code], exc.detail)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                status = 499
                raise
            except Exception as exc:  # the catch-all: one log line, no internals to the client
                status = 500
                log.error(
                    "unhandled error in gRPC %s (request id %s)", method, context.request_id, exc_info=exc
                )
                await rpc.abort(grpc.StatusCode.INTERNAL, "internal server error")
            finally:
                context.finish(status < 400)
                if method not in ("ServerLive", "ServerReady"):
                    _count(state, method, status, started)

        return behavior

    # -- reading a message -----------------------------------------------------------------

    async def _read(self, rpc, context: RequestContext, small: bool = False) -> bytes:
        """The call's request message, read within its memory reservation and READ_TIMEOUT_S."""
        s, budget = self.state.settings, self.state.body_budget
        limit = s.max_upload_bytes
        try:
            lease = await budget.reserve(2 * limit, timeout=s.request_timeout_s)
        except asyncio.TimeoutError:
            raise Overloaded("server busy: no memory free for request messages; retry later") from None
        context.hold(lease)
        try:
            message = await asyncio.wait_for(rpc.read(), s.read_timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"the request message did not arrive within {s.read_timeout_s:g} s (READ_TIMEOUT_S)"
            ) from None
        if message is grpc.aio.EOF:
            raise InvalidRequest("the call carried no request message")
        lease.shrink(2 * len(message))
        if small and len(message) > SMALL_MESSAGE:
            raise PayloadTooLarge(
                f"a request message of {len(message)} bytes; this call takes at most {SMALL_MESSAGE}"
            )
        return message

    async def _parse(self, cls, rpc, context: RequestContext):
        raw = await self._read(rpc, context, small=True)
        try:
            return cls.FromString(raw)
        except Exception as exc:  # protobuf's DecodeError
            raise InvalidRequest(f"malformed request message: {exc}") from None

    # -- the calls ---------------------------------------------------------------------

    async def _server_live(self, rpc, context, method) -> bytes:
        return pb.ServerLiveResponse(live=dataplane.live(self.state)).SerializeToString()

    async def _server_ready(self, rpc, context, method) -> bytes:
        return pb.ServerReadyResponse(ready=dataplane.ready(self.state)).SerializeToString()

    async def _server_metadata(self, rpc, context, method) -> bytes:
        return pb.ServerMetadataResponse(**dataplane.server_metadata(self.state)).SerializeToString()

    async def _model_ready(self, rpc, context, method) -> bytes:
        request = await self._parse(pb.ModelReadyRequest, rpc, context)
        try:
            dataplane.served_model(self.state, request.name, request.version or None)
        except VersionNotLoaded:  # in the repository, not serving: not ready, as Triton answers
            return pb.ModelReadyResponse(ready=False).SerializeToString()
        return pb.ModelReadyResponse(ready=dataplane.ready(self.state)).SerializeToString()

    async def _model_metadata(self, rpc, context, method) -> bytes:
        request = await self._parse(pb.ModelMetadataRequest, rpc, context)
        meta = dataplane.model_metadata(self.state, request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        ).SerializeToString()

    async def _model_config(self, rpc, context, method) -> bytes:
        request = await self._parse(pb.ModelConfigRequest, rpc, context)
        config = dataplane.model_config(self.state, request.name, request.version or None)
        return pb.ModelConfigResponse(
            config=json_format.ParseDict(config, mc.ModelConfig())
        ).SerializeToString()

    async def _model_statistics(self, rpc, context, method) -> bytes:
        request = await self._parse(pb.ModelStatisticsRequest, rpc, context)
        stats = dataplane.model_statistics(self.state, request.name or None, request.version or None)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse()).SerializeToString()

    async def _infer(self, rpc, context: RequestContext, method) -> bytes:
        state = self.state
        check_ready(state)
        check_room(state)
        raw = await self._read(rpc, context)
        try:
            name, version, req = await pool_call(
                state, decode_infer_request, raw, state.settings.max_images_per_request
            )
        except V2TooLarge as exc:
            raise PayloadTooLarge(str(exc)) from None
        except V2Error as exc:
            raise InvalidRequest(str(exc)) from None
        seg = dataplane.served_model(state, name, version or None)
        if (
            not context.id_given and req.id and SAFE_REQUEST_ID.fullmatch(req.id)
        ):  # no x-request-id: the message's id
            context.request_id = req.id
        converting = None  # typed numbers are converted on the I/O pool, at up to 3x their bytes for a moment
        if any(t.packed is not None for t in req.inputs):
            converting = await reserve_output(state, context, 3 * len(raw), "converting uint_contents")
        del raw  # the tensors are views of it: it lives as long as they do
        outputs, timing = await dataplane.infer(state, seg, context, req, converting)
        reply_id = req.id or ""
        del req
        # What grpc copies the response into, until it is sent (the data plane reserved the buffer).
        await reserve_output(state, context, sum(out.nbytes for out in outputs), "the gRPC response")
        with state.tracing.span("encode"):
            response = await pool_call(
                state, encode_infer_response, seg.name, timing.model_version, reply_id, outputs
            )
        trailing = {**timing.headers(), "X-Request-ID": context.request_id}
        rpc.set_trailing_metadata(tuple((k.lower(), v) for k, v in trailing.items()))
        return response

    async def _shared_memory(self, rpc, context, method) -> bytes:
        kind = "CUDA" if method.startswith("Cuda") else "system"
        raise InvalidRequest(f"{method}: " + dataplane.SHARED_MEMORY_REFUSED.format(kind=kind))

    async def _unimplemented(self, rpc, context, method) -> bytes:
        raise NotImplementedCall(
            f"chanseg does not implement {method}; it serves the Open Inference Protocol's health, metadata, "
            "inference and model-repository calls"
        )


async def start_grpc_server(state) -> grpc.aio.Server:
    """The gRPC server on ``HOST:GRPC_PORT``, started (in the running event loop)."""
    s = state.settings
    limit = s.max_upload_bytes  # follows MEMORY_BUDGET_MB (settings)
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(state)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(limit, s.max_output_bytes + (1 << 20))),
            ("grpc.max_concurrent_streams", s.max_connections),
            # Without BDP probing a stream's window opens for the message being read, not
            # before: calls waiting for their memory reservation buffer 64 KiB each, not ~8 MiB
            # (measured: 16 such 30 MiB calls held +130 MiB with it, +2 MiB without; as fast).
            ("grpc.http2.bdp_probe", 0),
        ],
    )
    server.add_generic_rpc_handlers([InferenceService(state).handler()])
    address = f"{s.host}:{s.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"gRPC: cannot listen on {address}")
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", address)
    return server
