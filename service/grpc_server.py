"""The Open Inference Protocol over gRPC: the ``GRPCInferenceService`` that
``tritonclient.grpc`` speaks (server live/ready/metadata, model ready/metadata, infer
with raw contents), on its own port (``GRPC_PORT``), in the same process and event
loop as the HTTP server.

It shares everything behind the HTTP routes: the batcher, the limits (the message
size is ``MAX_UPLOAD_BYTES``; images, pixels, output size as for v2 over HTTP), the
memory budget, the API key (metadata ``authorization: Bearer KEY`` or ``x-api-key``),
the metrics (endpoint ``grpc_<method>``) and the drain (new calls ``UNAVAILABLE``;
the server stops within the shutdown budget). An infer request becomes the same
``v2_codec.InferRequest`` the HTTP route parses, and runs through the same
``routes.v2.run_inference``; errors map to gRPC codes: malformed ``INVALID_ARGUMENT``,
too large ``RESOURCE_EXHAUSTED``, overload and draining ``UNAVAILABLE``, deadline
``DEADLINE_EXCEEDED``, unknown model ``NOT_FOUND``, no key ``UNAUTHENTICATED``.

The service definitions come from ``tritonclient[grpc]`` (its generated
``service_pb2``): the ``grpc`` extra.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Dict, List

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

import model

from .deps import check_api_key, check_ready, check_room
from .errors import ApiError, InvalidRequest
from .interface import v2_inputs, v2_outputs
from .routes.v2 import run_inference, served_model
from .v2_codec import DTYPES, InferRequest, Tensor

log = logging.getLogger("chanseg.grpc")

__all__ = ["start_grpc_server"]

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# gRPC's numbers beside HTTP's, for the shared chanseg_requests_total{status}.
_HTTP_STATUS = {code: status for status, code in _CODES.items()} | {grpc.StatusCode.OK: 200, grpc.StatusCode.INTERNAL: 500}


class _Call:
    """What the shared pipeline needs of a request, for one gRPC call: its scope (request
    id, start, the memory it holds until answered) and ``receive`` (the client gone)."""

    def __init__(self, context: grpc.aio.ServicerContext, request_id: str) -> None:
        self.scope: Dict[str, Any] = {"chanseg": {"request_id": request_id, "started": time.monotonic(), "leases": []}}
        self._gone = asyncio.Event()
        context.add_done_callback(lambda _: self._gone.set())

    async def receive(self) -> dict:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    def release(self) -> None:
        for lease in self.scope["chanseg"]["leases"]:
            lease.release()


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state) -> None:
        self.state = state

    # -- health and metadata (open, like their HTTP forms, except model metadata) ---------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.state.unhealthy() is None)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.serving)

    async def ModelReady(self, request, context):
        return await self._handled("model_ready", context, self._model_ready, request)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="chanseg", version=model.__version__, extensions=["binary_tensor_data"])

    async def ModelMetadata(self, request, context):
        return await self._handled("model_metadata", context, self._model_metadata, request, context)

    async def ModelInfer(self, request, context):
        with self.state.tracing.server_span("ModelInfer", dict(context.invocation_metadata() or ())):
            return await self._handled("infer", context, self._infer, request, context)

    # -- the work ------------------------------------------------------------------------

    async def _model_ready(self, request) -> Any:
        served_model(self.state, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=self.state.serving)

    async def _model_metadata(self, request, context) -> Any:
        self._authorize(context)
        seg = served_model(self.state, request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=seg.name,
            versions=[seg.version],
            platform=f"pytorch_{seg.format}",
            inputs=[tensor(**t) for t in v2_inputs(seg)],
            outputs=[tensor(**t) for t in v2_outputs(seg)],
        )

    async def _infer(self, request, context) -> Any:
        state = self.state
        self._authorize(context)
        check_ready(state)
        check_room(state)
        seg = served_model(state, request.model_name, request.model_version or None)
        call = _Call(context, request.id or uuid.uuid4().hex)
        deadline = call.scope["chanseg"]["started"] + state.settings.request_timeout_s
        try:
            outputs, timing = await run_inference(state, seg, call, _as_infer_request(request), deadline)
            response = pb.ModelInferResponse(model_name=seg.name, model_version=timing.model_version, id=request.id)
            for out in outputs:
                response.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
                buffer = bytearray(out.nbytes)
                out.write(buffer, 0)
                response.raw_output_contents.append(bytes(buffer))
            context.set_trailing_metadata(tuple((k.lower(), v) for k, v in timing.headers().items()))
            return response
        finally:
            call.release()

    def _authorize(self, context) -> None:
        check_api_key(self.state, dict(context.invocation_metadata() or ()))

    async def _handled(self, endpoint: str, context, fn, *args) -> Any:
        """``fn(*args)``, its ApiError as the gRPC status it maps to, and the call counted."""
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            return await fn(*args)
        except ApiError as exc:
            code = _CODES.get(exc.status, grpc.StatusCode.INTERNAL)
            await context.abort(code, exc.detail)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # the catch-all: one log line, no internals to the client
            code = grpc.StatusCode.INTERNAL
            log.error("unhandled error in gRPC %s", endpoint, exc_info=exc)
            await context.abort(code, "internal server error")
        finally:
            metrics = self.state.metrics
            metrics.requests.labels(f"grpc_{endpoint}", str(_HTTP_STATUS.get(code, 500))).inc()
            metrics.request_duration.labels(f"grpc_{endpoint}").observe(time.perf_counter() - started)


def _as_infer_request(request) -> InferRequest:
    """A gRPC ModelInferRequest as the parsed form the HTTP route makes: raw contents
    (``tritonclient.grpc``'s way) as binary data, typed contents as binary too."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidRequest(
            f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs"
        )
    inputs: List[Tensor] = []
    for i, tensor in enumerate(request.inputs):
        if tensor.datatype not in DTYPES and tensor.datatype != "BYTES":
            raise InvalidRequest(f"input '{tensor.name}': unknown datatype {tensor.datatype}")
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidRequest(f"input '{tensor.name}': negative dimension in shape {list(shape)}")
        raw = request.raw_input_contents[i] if request.raw_input_contents else _typed_contents(tensor)
        if tensor.datatype != "BYTES":
            expected = int(np.prod(shape, dtype=object)) * np.dtype(DTYPES[tensor.datatype]).itemsize
            if len(raw) != expected:
                raise InvalidRequest(
                    f"input '{tensor.name}': {len(raw)} bytes of data for {tensor.datatype} {list(shape)} ({expected} bytes)"
                )
        inputs.append(Tensor(tensor.name, tensor.datatype, shape, binary=memoryview(raw)))
    outputs = {out.name: True for out in request.outputs}
    return InferRequest(id=request.id or None, inputs=inputs, outputs=outputs, binary_default=True)


def _typed_contents(tensor) -> bytes:
    """Typed contents (``uint_contents`` for UINT8, ``bytes_contents`` for BYTES) as raw bytes."""
    contents = tensor.contents
    if tensor.datatype == "BYTES":
        return b"".join(len(item).to_bytes(4, "little") + item for item in contents.bytes_contents)
    if tensor.datatype == "UINT8":
        values = np.asarray(contents.uint_contents, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise InvalidRequest(f"input '{tensor.name}': UINT8 values must be 0..255")
        return values.astype(np.uint8).tobytes()
    raise InvalidRequest(f"input '{tensor.name}': send {tensor.datatype} as raw_input_contents")


async def start_grpc_server(state) -> grpc.aio.Server:
    """The gRPC server on ``HOST:GRPC_PORT``, started (in the running event loop)."""
    s = state.settings
    limit = s.max_upload_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(limit, s.max_output_bytes + (1 << 20))),
            ("grpc.max_concurrent_streams", s.max_connections),
        ]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    address = f"{s.host}:{s.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"gRPC: cannot listen on {address}")
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", address)
    return server

