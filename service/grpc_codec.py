"""gRPC's ``ModelInferRequest`` and ``ModelInferResponse`` read and written at the wire
level, as the v2 codec's forms (:class:`~service.v2_codec.InferRequest`,
:class:`~service.v2_codec.Output`).

Why not protobuf's parser for the whole message: it runs on the thread that calls it
holding the interpreter lock, and its memory follows the message's structure, not its
size. Measured here (upb): 15 M empty ``bytes_contents`` in a 29 MiB message took
0.74 s and 256 MiB to parse, 1.9 M empty ``inputs`` in 7 MiB 0.19 s and 300 MiB (42
times the message). So the message's fields are walked first, at most
:data:`MAX_FIELDS` in all (a legal request has a handful), its large payloads
(raw contents, packed numbers, encoded images) stay views of the received bytes, and
only the small rest (at most :data:`MAX_DESCRIPTION_BYTES`) is given to protobuf. Typed numbers are counted (a packed
varint ends in a byte under 0x80) and checked against the shape before anything is
converted; the conversion is :meth:`Tensor.array`'s, on the I/O pool, after the
request's limits were checked.

Responses: protobuf copies every bytes field it is given (each output twice more). The
response is instead written into one buffer, the outputs straight into their
``raw_output_contents``.

Protobuf's wire format: https://protobuf.dev/programming-guides/encoding/
"""

from __future__ import annotations

import math
from typing import Iterator, List, Optional, Tuple

from tritonclient.grpc import service_pb2 as pb

from .v2_codec import (
    DTYPES,
    MAX_DIMS,
    InferRequest,
    Output,
    Tensor,
    V2Error,
    V2TooLarge,
    refuse_shared_memory,
    varint_count,
)

__all__ = ["MAX_FIELDS", "MAX_DESCRIPTION_BYTES", "decode_infer_request", "encode_infer_response"]

# Fields in one request, at every level together (inputs, outputs, parameters, dims sent unpacked...).
MAX_FIELDS = 1024
# What protobuf parses: the request less its payloads (names, shapes, parameters, id, outputs).
MAX_DESCRIPTION_BYTES = 64 << 10
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
# ModelInferRequest: 5 inputs, 7 raw_input_contents; InferInputTensor: 5 contents;
# InferTensorContents: 4 uint_contents, 8 bytes_contents (1-7 numbers of each type).
_INPUTS, _RAW = 5, 7
_CONTENTS = 5
_UINT, _BYTES = 4, 8
_CONTENT_FIELDS = {1: "bool", 2: "int", 3: "int64", 4: "uint", 5: "uint64", 6: "fp32", 7: "fp64", 8: "bytes"}


def _varint(buf: memoryview, pos: int, end: int) -> Tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise V2Error("malformed request message: a truncated or over-long varint")


class _Walk:
    """The fields of one request message, counted across all its levels."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.count = buf, 0

    def fields(self, start: int, end: int, what: str) -> Iterator[Tuple[int, int, int, int, int]]:
        """Each field of the message in ``buf[start:end]``: (number, wire type, where the
        field starts, where its payload starts, where it ends)."""
        for field in _fields(self.buf, start, end, what):
            self.count += 1
            if self.count > MAX_FIELDS:
                raise V2Error(
                    f"request message: more than {MAX_FIELDS} fields (numbers in typed contents must be packed)"
                )
            yield field


def _fields(buf: memoryview, start: int, end: int, what: str) -> Iterator[Tuple[int, int, int, int, int]]:
    pos = start
    while pos < end:
        key, body = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, stop = _varint(buf, body, end)
        elif wire == _FIXED64:
            stop = body + 8
        elif wire == _FIXED32:
            stop = body + 4
        elif wire == _LENGTH:
            length, body = _varint(buf, body, end)
            stop = body + length
        else:
            raise V2Error(f"malformed request message: wire type {wire} in {what}")
        if stop > end or number == 0:
            raise V2Error(f"malformed request message: a field overruns {what}")
        yield number, wire, pos, body, stop
        pos = stop


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _Input:
    """One ``InferInputTensor`` as walked: its small fields (for protobuf) and its contents."""

    def __init__(self, walk: _Walk, start: int, end: int, max_elements: int) -> None:
        self.small = bytearray()  # every field but contents, re-encoded
        self.runs: dict = {}  # contents field number -> payloads (packed runs, or bytes elements)
        self.unpacked = 0  # numbers sent one field each
        buf = walk.buf
        for number, wire, first, body, stop in walk.fields(start, end, "an input"):
            if number == _CONTENTS and wire == _LENGTH:
                self._contents(walk, body, stop, max_elements)
            else:
                self.small += buf[first:stop]

    def _contents(self, walk: _Walk, start: int, end: int, max_elements: int) -> None:
        buf = walk.buf
        for number, wire, _, body, stop in walk.fields(start, end, "an input's contents"):
            if number not in _CONTENT_FIELDS:
                continue
            if wire != _LENGTH:
                self.unpacked += 1
            self.runs.setdefault(number, []).append(buf[body:stop])
            if number == _BYTES and len(self.runs[number]) > max_elements:
                raise V2TooLarge(
                    f"more than {max_elements} bytes_contents elements: at most {max_elements} images per request "
                    "(MAX_IMAGES_PER_REQUEST)"
                )


def decode_infer_request(raw: bytes, max_elements: int) -> Tuple[str, str, InferRequest]:
    """(model name, model version, the request) of a serialized ``ModelInferRequest``,
    its tensors still views of ``raw``. ``max_elements``: most BYTES elements one input
    may hold. Raises :class:`V2Error` (400) or :class:`V2TooLarge` (413)."""
    buf = memoryview(raw)
    walk = _Walk(buf)
    small = bytearray()  # the message without its payloads: for protobuf
    walked: List[_Input] = []
    raw_contents: List[memoryview] = []
    for number, wire, first, body, stop in walk.fields(0, len(buf), "the request"):
        if number == _INPUTS and wire == _LENGTH:
            walked.append(_Input(walk, body, stop, max_elements))
            small += _key(_INPUTS, _LENGTH) + _encode_varint(len(walked[-1].small)) + walked[-1].small
        elif number == _RAW and wire == _LENGTH:
            raw_contents.append(buf[body:stop])
        else:
            small += buf[first:stop]
    if len(small) > MAX_DESCRIPTION_BYTES:  # protobuf's parse of it holds the interpreter lock
        raise V2TooLarge(
            f"the request's description (names, shapes, parameters, id, outputs) takes {len(small)} bytes, "
            f"over the limit of {MAX_DESCRIPTION_BYTES}"
        )
    try:
        message = pb.ModelInferRequest.FromString(bytes(small))
    except Exception as exc:  # protobuf's DecodeError, or a string that is not UTF-8
        raise V2Error(f"malformed request message: {exc}") from None
    if raw_contents and len(raw_contents) != len(walked):
        raise V2Error(f"{len(raw_contents)} raw_input_contents for {len(walked)} inputs")
    inputs = [
        _tensor(described, found, raw_contents[i] if raw_contents else None)
        for i, (described, found) in enumerate(zip(message.inputs, walked))
    ]
    for described in message.inputs:
        refuse_shared_memory(f"input '{described.name}'", described.parameters)
    for out in message.outputs:
        refuse_shared_memory(f"output '{out.name}'", out.parameters)
    outputs = {out.name: True for out in message.outputs}
    request = InferRequest(id=message.id or None, inputs=inputs, outputs=outputs, binary_default=True)
    return message.model_name, message.model_version, request


def _tensor(described, walked: _Input, raw: Optional[memoryview]) -> Tensor:
    name, datatype = described.name, described.datatype
    if datatype not in DTYPES and datatype != "BYTES":
        raise V2Error(f"input '{name}': unknown datatype {datatype}")
    if len(described.shape) > MAX_DIMS:
        raise V2Error(f"input '{name}': {len(described.shape)} dimensions, at most {MAX_DIMS}")
    shape = tuple(int(d) for d in described.shape)
    if any(d < 0 for d in shape):
        raise V2Error(f"input '{name}': negative dimension in shape {list(shape)}")
    tensor = Tensor(name, datatype, shape)
    if raw is not None:
        if walked.runs:
            raise V2Error(f"input '{name}': data in both contents and raw_input_contents")
        tensor.expect_bytes(len(raw))
        tensor.binary = raw
        return tensor
    given = sorted(walked.runs)
    if datatype == "BYTES" and given in ([], [_BYTES]):
        tensor.elements = walked.runs.get(_BYTES, [])
        if len(tensor.elements) != tensor.count:
            raise V2Error(
                f"input '{name}': {len(tensor.elements)} bytes_contents for a shape of {tensor.count}"
            )
        return tensor
    if datatype == "UINT8" and given in ([], [_UINT]):
        if walked.unpacked:
            raise V2Error(
                f"input '{name}': uint_contents must be packed (as every protobuf library sends them)"
            )
        tensor.packed = walked.runs.get(_UINT, [])
        count = varint_count(tensor.packed)
        if count != math.prod(shape):
            raise V2Error(
                f"input '{name}': {count} values in uint_contents for a shape of {tensor.count} elements"
            )
        return tensor
    if datatype in ("UINT8", "BYTES"):
        sent = ", ".join(f"{_CONTENT_FIELDS[n]}_contents" for n in given)
        wanted = "uint_contents" if datatype == "UINT8" else "bytes_contents"
        raise V2Error(
            f"input '{name}': {datatype} data goes in {wanted}, or in raw_input_contents (got {sent})"
        )
    raise V2Error(f"input '{name}': send {datatype} as raw_input_contents")


def encode_infer_response(
    model_name: str, model_version: str, request_id: str, outputs: List[Output]
) -> bytes:
    """A serialized ``ModelInferResponse``: the outputs described, their data written
    straight into ``raw_output_contents`` in one buffer, which becomes the bytes grpc takes."""
    head = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    for out in outputs:
        head.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
    header = head.SerializeToString()
    keys = [_key(6, _LENGTH) + _encode_varint(out.nbytes) for out in outputs]  # 6: raw_output_contents
    body = bytearray(len(header) + sum(len(k) + out.nbytes for k, out in zip(keys, outputs)))
    body[: len(header)] = header
    offset = len(header)
    for key, out in zip(keys, outputs):
        body[offset : offset + len(key)] = key
        offset += len(key)
        out.write(body, offset)
        offset += out.nbytes
    payload = bytes(body)
    del body  # twice the response only for the moment of the copy
    return payload
