"""Open Inference Protocol (v2) request/response bodies, with the binary tensor
data extension. No web framework here: bytes in, numpy arrays out, and back.

Binary extension: the request's JSON header is the first
``Inference-Header-Content-Length`` bytes of the body; inputs with a
``binary_data_size`` parameter take their bytes, in input order, from what
follows. ``BYTES`` elements are each a 4-byte little-endian length and the
bytes (in JSON, a string: we take base64 of the encoded image file).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

__all__ = [
    "V2Error",
    "Tensor",
    "InferRequest",
    "parse_infer_request",
    "encode_infer_response",
    "DTYPES",
]

DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip


class V2Error(ValueError):
    """A malformed request: 400 with ``{"error": message}``."""


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: Tuple[int, ...]
    value: Any  # numpy array, or a list of bytes for BYTES


@dataclass
class InferRequest:
    id: Optional[str]
    inputs: List[Tensor]
    outputs: Dict[str, bool]  # requested output name -> binary?
    binary_default: bool
    parameters: Dict[str, Any] = field(default_factory=dict)


def _shape(raw: Any, name: str) -> Tuple[int, ...]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise V2Error(f"input '{name}': shape must be a list of non-negative integers, got {raw!r}")
    return tuple(raw)


def _split_bytes(blob: bytes, name: str) -> List[bytes]:
    items, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise V2Error(f"input '{name}': truncated BYTES element length")
        (length,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise V2Error(f"input '{name}': BYTES element of {length} bytes overruns the data")
        items.append(blob[offset : offset + length])
        offset += length
    return items


def _flatten(data: Any) -> List[Any]:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _input(raw: Dict[str, Any], binary: memoryview, offset: int) -> Tuple[Tensor, int]:
    if not isinstance(raw, dict):
        raise V2Error("each input must be an object")
    name = raw.get("name")
    datatype = raw.get("datatype")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise V2Error("each input needs a string 'name' and 'datatype'")
    shape = _shape(raw.get("shape"), name)
    count = int(np.prod(shape)) if shape else 1
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise V2Error(f"input '{name}': parameters must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0:
            raise V2Error(f"input '{name}': binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise V2Error(
                f"input '{name}': binary_data_size {size} overruns the {len(binary) - offset} bytes left"
            )
        blob = bytes(binary[offset : offset + size])
        offset += size
        if datatype == "BYTES":
            value: Any = _split_bytes(blob, name)
            if len(value) != count:
                raise V2Error(f"input '{name}': {len(value)} BYTES elements for shape {list(shape)}")
        elif datatype in DTYPES:
            dtype = np.dtype(DTYPES[datatype])
            if size != count * dtype.itemsize:
                raise V2Error(
                    f"input '{name}': {size} bytes for shape {list(shape)} of {datatype} "
                    f"(expected {count * dtype.itemsize})"
                )
            value = np.frombuffer(blob, dtype=dtype.newbyteorder("<")).reshape(shape)
        else:
            raise V2Error(f"input '{name}': unknown datatype {datatype}")
        return Tensor(name, datatype, shape, value), offset
    if "data" not in raw:
        raise V2Error(f"input '{name}': no 'data' and no binary_data_size")
    flat = _flatten(raw["data"])
    if len(flat) != count:
        raise V2Error(f"input '{name}': {len(flat)} values for shape {list(shape)} ({count} expected)")
    if datatype == "BYTES":
        try:
            value = [base64.b64decode(x, validate=True) for x in flat]
        except (binascii.Error, TypeError, ValueError):
            raise V2Error(
                f"input '{name}': BYTES in JSON must be base64 strings of the encoded images"
            ) from None
        return Tensor(name, datatype, shape, value), offset
    if datatype not in DTYPES:
        raise V2Error(f"input '{name}': unknown datatype {datatype}")
    try:
        array = np.asarray(flat, dtype=np.float64 if datatype.startswith("FP") else np.int64)
    except (TypeError, ValueError):
        raise V2Error(f"input '{name}': data holds values that are not numbers") from None
    info = np.finfo if datatype.startswith("FP") else np.iinfo
    limits = info(DTYPES[datatype]) if datatype != "BOOL" else None
    if limits is not None and array.size and (array.min() < limits.min or array.max() > limits.max):
        raise V2Error(f"input '{name}': values out of range for {datatype}")
    return Tensor(name, datatype, shape, array.astype(DTYPES[datatype]).reshape(shape)), offset


def parse_infer_request(body: bytes, header_length: Optional[str]) -> InferRequest:
    """Parse an infer request body (JSON, or JSON + binary tensor data)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise V2Error("Inference-Header-Content-Length must be an integer") from None
        if n < 0 or n > len(body):
            raise V2Error(f"Inference-Header-Content-Length {n} overruns the {len(body)}-byte body")
        header, binary = body[:n], memoryview(body)[n:]
    else:
        header, binary = body, memoryview(b"")
    try:
        doc = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise V2Error(f"request header is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise V2Error("request must be a JSON object with a non-empty 'inputs' list")
    inputs, offset = [], 0
    for raw in doc["inputs"]:
        tensor, offset = _input(raw, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise V2Error(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise V2Error("parameters must be an object")
    binary_default = bool(params.get("binary_data_output", False))
    outputs: Dict[str, bool] = {}
    for raw in doc.get("outputs") or []:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise V2Error("each requested output needs a string 'name'")
        out_params = raw.get("parameters") or {}
        outputs[raw["name"]] = bool(out_params.get("binary_data", binary_default))
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2Error("'id' must be a string")
    return InferRequest(request_id, inputs, outputs, binary_default, params)


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: Optional[str],
    outputs: List[Tuple[str, np.ndarray, bool]],
) -> Tuple[bytes, Optional[int]]:
    """Body of an infer response; the JSON header's length when binary data follows."""
    names = {np.dtype(v).name: k for k, v in DTYPES.items()}
    described, blobs = [], []
    for name, array, binary in outputs:
        entry: Dict[str, Any] = {
            "name": name,
            "datatype": names[array.dtype.name],
            "shape": list(array.shape),
        }
        if binary:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    doc: Dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": described}
    if request_id is not None:
        doc["id"] = request_id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
