"""Open Inference Protocol (v2) request/response bodies, with the binary tensor
data extension. No web framework here: bytes in, described tensors out, and back.

Decoding is split so a server can check what a request asks for before it
spends memory on it:

- :func:`decode_request` parses the JSON header and validates its structure
  (:class:`InferRequestBody`, whose JSON schema is also the endpoint's OpenAPI
  request body); each input becomes a :class:`Tensor` that knows its name,
  datatype, shape and where its data is, but holds no array yet;
- :meth:`Tensor.array` and :meth:`Tensor.items` materialise one tensor.

Binary extension: the request's JSON header is the first
``Inference-Header-Content-Length`` bytes of the body; inputs with a
``binary_data_size`` parameter take their bytes, in input order, from what
follows. ``BYTES`` elements are each a 4-byte little-endian length and the
bytes (in JSON, a string: we take base64 of the encoded image file).

Every malformed body raises :class:`V2Error` (the server's 400), never another
exception: shapes are multiplied as Python integers (no int64 overflow),
integers beyond 64 bits, nesting deeper than the shape, non-object parameters
and non-list outputs are all named in the message.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Dict, List, Literal, Optional, Tuple, Union

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic.json_schema import WithJsonSchema

from . import v2_json
from .v2_json import Numbers

__all__ = [
    "V2Error",
    "V2TooLarge",
    "Tensor",
    "InferRequest",
    "InferRequestBody",
    "Output",
    "decode_request",
    "varint_count",
    "encode_response",
    "request_schema",
    "DTYPES",
    "MAX_DIMS",
]

DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip


class V2Error(ValueError):
    """A malformed request: 400 with ``{"error": message}``."""


class V2TooLarge(V2Error):
    """A well-formed request over a limit: 413."""


# A JSON header is read by service.v2_json: its inputs' long numeric "data" by numpy with
# Python's interpreter lock let go, the rest by orjson. How much JSON a request may hold is
# MAX_JSON_BYTES (from the memory budget: parsing costs JSON_PARSE_COST times the bytes).
# JSON outputs are written by orjson this many values at a time, so the lock is let go
# between pieces (~0.1 ms each; json.dumps of the values as a list took 19x longer:
# 124 against 6.6 ms for 4x256x256 FP32 logits, measured in one run here).
_JSON_CHUNK = 1 << 12

# -- the request's JSON header, as a schema ------------------------------------

_DATA_SCHEMA = {
    "type": "array",
    "description": "the tensor's elements, flat in row-major order or nested as its shape; "
    "BYTES elements are base64 strings",
    "items": {"anyOf": [{"type": "number"}, {"type": "string"}, {"type": "boolean"}, {"type": "array"}]},
}
Dim = Annotated[StrictInt, Field(ge=0)]
# Dimensions of one tensor: a shape's element count is their product, and a product of
# 131,072 huge dimensions (fits in 2.7 MB of JSON) takes ~55 s with the lock held.
MAX_DIMS = 16


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    shape: Annotated[List[Dim], Field(max_length=MAX_DIMS)]
    datatype: Datatype
    parameters: Optional[Dict[str, Any]] = Field(
        None, description="binary_data_size: the byte count of this input's data after the JSON header"
    )
    data: Annotated[Optional[Any], WithJsonSchema(_DATA_SCHEMA)] = None


class RequestOutputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")  # read for shared_memory_* (refuse_shared_memory)

    binary_data: Optional[StrictBool] = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    parameters: Optional[RequestOutputParameters] = None


class RequestParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data_output: Optional[StrictBool] = None


class InferRequestBody(BaseModel):
    """The JSON (header) of a v2 infer request."""

    model_config = ConfigDict(extra="ignore")

    id: Optional[StrictStr] = None
    parameters: Optional[RequestParameters] = None
    inputs: List[RequestInput] = Field(min_length=1)
    outputs: Optional[List[RequestOutput]] = None


def request_schema() -> Dict[str, Any]:
    """:class:`InferRequestBody`'s JSON schema with its definitions inlined (for OpenAPI)."""
    schema = InferRequestBody.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


# -- described tensors --------------------------------------------------------


@dataclass
class Tensor:
    """One input: what it is and where its data is (not yet an array). The data is one
    of: ``data`` (JSON), ``binary`` (raw little-endian bytes), ``packed`` (protobuf's
    packed varints, gRPC's typed ``uint_contents``) or ``elements`` (BYTES elements, gRPC's
    ``bytes_contents``)."""

    name: str
    datatype: str
    shape: Tuple[int, ...]
    data: Any = None  # the JSON "data", when not binary
    binary: Optional[memoryview] = None  # its bytes after the JSON header, or gRPC's raw contents
    packed: Optional[List[memoryview]] = None  # gRPC: packed varint runs of uint_contents (UINT8)
    elements: Optional[List[memoryview]] = None  # gRPC: bytes_contents

    @property
    def count(self) -> int:
        return math.prod(self.shape)  # Python integers: no overflow

    def expect_bytes(self, size: int) -> None:
        """Raise unless ``size`` bytes is exactly this numeric tensor's data."""
        if self.datatype == "BYTES":
            return
        expected = self.count * np.dtype(DTYPES[self.datatype]).itemsize
        if size != expected:
            raise V2Error(
                f"input '{self.name}': {size} bytes for shape {list(self.shape)} of {self.datatype} (expected {expected})"
            )

    def array(self) -> np.ndarray:
        """The elements of a numeric tensor, shaped (a read-only view for binary data)."""
        if self.datatype == "BYTES":
            raise V2Error(f"input '{self.name}': BYTES is not a numeric tensor")
        dtype = np.dtype(DTYPES[self.datatype]).newbyteorder("<")
        if self.binary is not None:
            return np.frombuffer(self.binary, dtype=dtype).reshape(self.shape)
        if self.packed is not None:
            return _uint8_varints(self.name, self.packed).reshape(self.shape)
        return _json_array(self.name, self.datatype, self.data, self.shape).reshape(self.shape)

    def items(self) -> List[Union[bytes, memoryview]]:
        """The elements of a BYTES tensor."""
        if self.datatype != "BYTES":
            raise V2Error(f"input '{self.name}': not a BYTES tensor")
        count = self.count
        if self.elements is not None:
            if len(self.elements) != count:
                raise V2Error(
                    f"input '{self.name}': {len(self.elements)} BYTES elements for a shape of {count}"
                )
            return list(self.elements)
        if self.binary is not None:
            return _split_bytes(self.binary, self.name, count)
        values = _flatten(self.data, self.name, count, len(self.shape))
        try:
            return [base64.b64decode(x, validate=True) for x in values]
        except (binascii.Error, TypeError, ValueError):
            raise V2Error(
                f"input '{self.name}': BYTES in JSON must be base64 strings of the encoded images"
            ) from None


def varint_count(runs: List[memoryview]) -> int:
    """How many values runs of packed varints hold (each value ends with a byte under 0x80)."""
    return sum(int(np.count_nonzero(np.frombuffer(run, dtype=np.uint8) < 0x80)) for run in runs)


def _uint8_varints(name: str, runs: List[memoryview]) -> np.ndarray:
    """Packed varints of values 0..255 as uint8, vectorised (numpy lets go of the
    interpreter lock: ~0.2 s for 15 M values here, and the event loop runs meanwhile).

    A value under 128 is one byte; one of 128..255 is two, ``v | 0x80`` then ``1``, so
    the first byte is the value itself (``v & 0x7F`` when a value under 128 was sent
    in two bytes, with ``0``, which protobuf allows)."""
    raw = (
        np.concatenate([np.frombuffer(run, dtype=np.uint8) for run in runs])
        if runs
        else np.zeros(0, np.uint8)
    )
    continued = raw >= 0x80
    if not continued.any():
        return raw
    if continued[-1]:
        raise V2Error(f"input '{name}': truncated varint in uint_contents")
    second = raw[1:][continued[:-1]]  # the second byte of each two-byte value
    if second.max() > 1:
        raise V2Error(f"input '{name}': UINT8 values must be 0..255")
    first = np.ones(raw.size, dtype=bool)
    np.logical_not(continued[:-1], out=first[1:])
    values = raw[first]
    if second.min() == 0:
        two = continued[first]
        padded = two.copy()
        padded[two] = second == 0
        values[padded] &= 0x7F
    return values


@dataclass
class InferRequest:
    id: Optional[str]
    inputs: List[Tensor]
    outputs: Dict[str, bool]  # requested output name -> binary?
    binary_default: bool
    parameters: Dict[str, Any] = field(default_factory=dict)


def _split_bytes(blob: memoryview, name: str, count: int) -> List[memoryview]:
    items, offset = [], 0
    while offset < len(blob):
        if len(items) == count:
            raise V2Error(f"input '{name}': more than {count} BYTES elements for its shape")
        if offset + 4 > len(blob):
            raise V2Error(f"input '{name}': truncated BYTES element length")
        (length,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise V2Error(f"input '{name}': BYTES element of {length} bytes overruns the data")
        items.append(blob[offset : offset + length])
        offset += length
    if len(items) != count:
        raise V2Error(f"input '{name}': {len(items)} BYTES elements for a shape of {count}")
    return items


def _flatten(data: Any, name: str, count: int, depth: int) -> List[Any]:
    """Elements of a flat or nested list, at most ``depth`` levels deep, exactly ``count`` of them."""
    if not isinstance(data, list):
        raise V2Error(f"input '{name}': 'data' must be a list")
    out: List[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) >= max(1, depth):
                    raise V2Error(f"input '{name}': 'data' is nested deeper than its shape")
                stack.append(iter(item))
                break
            out.append(item)
            if len(out) > count:
                raise V2Error(f"input '{name}': more than {count} values for its shape")
        else:
            stack.pop()
    if len(out) != count:
        raise V2Error(f"input '{name}': {len(out)} values for a shape of {count} elements")
    return out


_KINDS = {"BOOL": "b", "FP16": "biuf", "FP32": "biuf", "FP64": "biuf"}  # integers: "iu"


def _json_array(name: str, datatype: str, data: Any, shape: Tuple[int, ...]) -> np.ndarray:
    count = math.prod(shape)
    if isinstance(data, Numbers):  # a long numeric array, read by numpy (service.v2_json)
        try:
            data = data.array(name, shape, integers=datatype not in _KINDS)
        except ValueError as exc:
            raise V2Error(str(exc)) from None
    elif not isinstance(data, list):
        raise V2Error(f"input '{name}': 'data' must be a list")
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise V2Error(f"input '{name}': 'data' is not a flat or regularly nested list of numbers") from None
    if array.size != count:
        raise V2Error(f"input '{name}': {array.size} values for a shape of {count} elements")
    if array.dtype.kind not in _KINDS.get(datatype, "iu"):
        what = "booleans" if datatype == "BOOL" else "numbers" if datatype.startswith("FP") else "integers"
        raise V2Error(f"input '{name}': {datatype} data must be {what} (within 64 bits)")
    target = np.dtype(DTYPES[datatype])
    if array.size and datatype != "BOOL":
        info = np.finfo(target) if target.kind == "f" else np.iinfo(target)
        low, high = array.min(), array.max()
        if not (np.isfinite(low) and np.isfinite(high)) or low < info.min or high > info.max:
            raise V2Error(f"input '{name}': values out of range for {datatype}")
    return array.astype(target).ravel()


def _loads(header: bytes) -> Any:
    try:
        return v2_json.loads(header)
    except v2_json.TooManyValues as exc:
        raise V2TooLarge(str(exc)) from None
    except ValueError as exc:  # orjson's JSONDecodeError (also too deep, or bad UTF-8), or ours
        raise V2Error(f"request header is not valid JSON: {exc}") from None


def _messages(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "request"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def decode_request(body: Union[bytes, memoryview], header_length: Optional[str]) -> InferRequest:
    """Parse an infer request body (JSON, or JSON + binary tensor data); no tensor
    is materialised. Raises :class:`V2Error` for anything malformed (the JSON's size
    is the caller's to limit: MAX_JSON_BYTES)."""
    view = memoryview(body)
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise V2Error("Inference-Header-Content-Length must be an integer") from None
        if n < 0 or n > len(view):
            raise V2Error(f"Inference-Header-Content-Length {n} overruns the {len(view)}-byte body")
        header, binary = view[:n], view[n:]
    else:
        header, binary = view, memoryview(b"")
    # The whole body is the JSON: read it as it is, not a copy of it (up to MAX_JSON_BYTES).
    doc = _loads(body if header_length is None and isinstance(body, bytes) else bytes(header))
    if not isinstance(doc, dict):
        raise V2Error("request must be a JSON object with a non-empty 'inputs' list")
    try:
        parsed = InferRequestBody.model_validate(doc)
    except ValidationError as exc:
        raise V2Error(_messages(exc)) from None
    inputs, offset = [], 0
    for raw in parsed.inputs:
        tensor, offset = _describe(raw, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise V2Error(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    params = parsed.parameters.model_dump() if parsed.parameters is not None else {}
    binary_default = bool(params.get("binary_data_output") or False)
    outputs: Dict[str, bool] = {}
    for out in parsed.outputs or []:
        refuse_shared_memory(f"output '{out.name}'", out.parameters.model_dump() if out.parameters else {})
        flag = out.parameters.binary_data if out.parameters is not None else None
        outputs[out.name] = binary_default if flag is None else flag
    return InferRequest(parsed.id, inputs, outputs, binary_default, params)


def _describe(raw: RequestInput, binary: memoryview, offset: int) -> Tuple[Tensor, int]:
    name, shape = raw.name, tuple(raw.shape)
    params = raw.parameters or {}
    refuse_shared_memory(f"input '{name}'", params)
    size = params.get("binary_data_size")
    tensor = Tensor(name, raw.datatype, shape)
    if size is None:
        if raw.data is None:
            raise V2Error(f"input '{name}': no 'data' and no binary_data_size")
        tensor.data = raw.data
        return tensor, offset
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise V2Error(f"input '{name}': binary_data_size must be a non-negative integer")
    if offset + size > len(binary):
        raise V2Error(
            f"input '{name}': binary_data_size {size} overruns the {len(binary) - offset} bytes left"
        )
    tensor.expect_bytes(size)
    tensor.binary = binary[offset : offset + size]
    return tensor, offset + size


def refuse_shared_memory(what: str, parameters) -> None:
    """A tensor placed in a shared-memory region (Triton's ``shared_memory_region``
    parameter) is refused, never served inline with the region left untouched."""
    if any(str(key).startswith("shared_memory") for key in parameters):
        raise V2Error(
            f"{what} names a shared-memory region: chanseg does not implement the system or CUDA "
            "shared-memory extensions; send the tensor in the request (the binary tensor data extension)"
        )


# -- the response ---------------------------------------------------------------


@dataclass
class Output:
    """One output tensor, written by ``fill`` into the array it is given."""

    name: str
    datatype: str
    shape: Tuple[int, ...]
    binary: bool
    fill: Optional[Callable[[np.ndarray], None]] = None
    items: Optional[List[bytes]] = None  # a BYTES output's elements, made beforehand

    @property
    def nbytes(self) -> int:
        if self.items is not None:  # binary BYTES: each element after its 4-byte length
            return sum(4 + len(item) for item in self.items)
        return math.prod(self.shape) * np.dtype(DTYPES[self.datatype]).itemsize

    def write(self, buffer: bytearray, offset: int) -> None:
        """The binary form of this output into ``buffer`` at ``offset``."""
        if self.items is not None:
            for item in self.items:
                buffer[offset : offset + 4] = struct.pack("<I", len(item))
                buffer[offset + 4 : offset + 4 + len(item)] = item
                offset += 4 + len(item)
            return
        dtype = np.dtype(DTYPES[self.datatype]).newbyteorder("<")
        view = np.frombuffer(buffer, dtype=dtype, count=math.prod(self.shape), offset=offset)
        self.fill(view.reshape(self.shape))


def encode_response(
    model_name: str, model_version: str, request_id: Optional[str], outputs: List[Output]
) -> Tuple[Union[bytes, bytearray], Optional[int]]:
    """Body of an infer response, and the JSON header's length when binary data follows.

    Binary outputs are written straight into the body's one buffer (no copies of
    the tensors); JSON outputs are filled into an array, then written as text a
    piece at a time (so the interpreter lock is let go between pieces)."""
    described: List[Dict[str, Any]] = []
    texts: List[List[bytes]] = []
    for out in outputs:
        entry: Dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if out.binary:
            entry["parameters"] = {"binary_data_size": out.nbytes}
        elif out.items is not None:
            entry["data"] = [item.decode("utf-8") for item in out.items]
        else:
            array = np.empty(out.shape, dtype=DTYPES[out.datatype])
            out.fill(array)
            entry["data"] = f"\x00{len(texts)}\x00"  # replaced by the values below
            texts.append(_json_values(array.ravel()))
            del array
        described.append(entry)
    doc: Dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": described}
    if request_id is not None:
        doc["id"] = request_id
    header = json.dumps(doc, separators=(",", ":")).encode()
    for i, text in enumerate(texts):
        before, after = header.split(json.dumps(f"\x00{i}\x00").encode(), 1)
        header = b"".join([before, *text, after])
    binary = [out for out in outputs if out.binary]
    if not binary:
        return header, None
    body = bytearray(len(header) + sum(out.nbytes for out in binary))
    body[: len(header)] = header
    offset = len(header)
    for out in binary:
        out.write(body, offset)
        offset += out.nbytes
    return body, len(header)


def _json_values(flat: np.ndarray) -> List[bytes]:
    """``[v0,v1,...]`` as pieces of bytes, made ``_JSON_CHUNK`` values at a time by orjson:
    each float as the shortest text that reads back as the same value of its own type
    (an FP32 0.1 is ``0.1``), a NaN or infinity as ``null`` (JSON has no such numbers)."""
    pieces = [b"["]
    for start in range(0, len(flat), _JSON_CHUNK):
        text = orjson.dumps(
            np.ascontiguousarray(flat[start : start + _JSON_CHUNK]), option=orjson.OPT_SERIALIZE_NUMPY
        )
        pieces.append(text[1:-1] if start == 0 else b"," + text[1:-1])
    pieces.append(b"]")
    return pieces
