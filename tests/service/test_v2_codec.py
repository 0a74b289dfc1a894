"""The v2 codec on its own: every malformed body is a V2Error (the server's 400),
never another exception, whatever the JSON, shapes, datatypes, binary data and
header lengths; and what decodes round-trips."""

from __future__ import annotations

import base64
import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.v2_codec import DTYPES, InferRequestBody, Output, V2Error, decode_request, encode_response

IMAGE = {"name": "IMAGE", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": list(range(12))}


def _body(**doc) -> bytes:
    return json.dumps({"inputs": [IMAGE], **doc}).encode()


def _materialise(req) -> None:
    for tensor in req.inputs:
        if tensor.datatype == "BYTES":
            tensor.items()
        else:
            tensor.array()


# The malformed bodies, and more: each a V2Error naming what is wrong.
MALFORMED = {
    "shape product overflows int64": (
        json.dumps({"inputs": [{**IMAGE, "shape": [2**40, 2**40, 2**40, 3]}]}),
        "values for a shape",
    ),
    "integer beyond int64 in data": (
        json.dumps({"inputs": [{**IMAGE, "data": [2**70] + list(range(11))}]}),
        "integers",
    ),
    "integer beyond int64 in shape": (
        json.dumps({"inputs": [{**IMAGE, "shape": [2**70]}]}),
        "shape",
    ),
    "deeply nested data": (
        json.dumps({"inputs": [{**IMAGE, "data": json.loads("[" * 500 + "1" + "]" * 500)}]}),
        "data",
    ),
    "nesting deeper than the parser allows": (
        '{"inputs": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "depth limit",
    ),
    "outputs is a number": (json.dumps({"inputs": [IMAGE], "outputs": 5}), "outputs"),
    "parameters is a list": (json.dumps({"inputs": [IMAGE], "parameters": [1]}), "parameters"),
    "output parameters is a string": (
        json.dumps({"inputs": [IMAGE], "outputs": [{"name": "MASK", "parameters": "binary"}]}),
        "parameters",
    ),
    "input parameters is a number": (json.dumps({"inputs": [{**IMAGE, "parameters": 3}]}), "parameters"),
    "binary_data is not a bool": (
        json.dumps({"inputs": [IMAGE], "outputs": [{"name": "MASK", "parameters": {"binary_data": "yes"}}]}),
        "binary_data",
    ),
    "shape with a bool": (json.dumps({"inputs": [{**IMAGE, "shape": [True, 2, 2, 3]}]}), "shape"),
    "negative dimension": (json.dumps({"inputs": [{**IMAGE, "shape": [-1, 2, 2, 3]}]}), "shape"),
    "unknown datatype": (json.dumps({"inputs": [{**IMAGE, "datatype": "UINT7"}]}), "datatype"),
    "floats for UINT8": (json.dumps({"inputs": [{**IMAGE, "data": [0.5] * 12}]}), "integers"),
    "strings for UINT8": (json.dumps({"inputs": [{**IMAGE, "data": ["1"] * 12}]}), "integers"),
    "ragged data": (json.dumps({"inputs": [{**IMAGE, "data": [[1, 2], [3]]}]}), "data"),
    "objects in data": (json.dumps({"inputs": [{**IMAGE, "data": [{}] * 12}]}), "data"),
    "data is not a list": (json.dumps({"inputs": [{**IMAGE, "data": 7}]}), "data"),
    "id is a number": (json.dumps({"inputs": [IMAGE], "id": 5}), "id"),
    "inputs empty": ('{"inputs": []}', "inputs"),
    "not an object": ("[1, 2]", "object"),
    "huge integer literal": ('{"inputs": [], "id": ' + "9" * 5000 + "}", "JSON"),
    "not utf-8": (b'{"inputs": "\xff\xfe"}', "JSON"),
    "NaN in FP32 data": (
        json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [float("nan")]}]}),
        "not valid JSON",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bodies_are_v2_errors(case):
    body, words = MALFORMED[case]
    body = body if isinstance(body, bytes) else body.encode()
    with pytest.raises(V2Error) as raised:
        _materialise(decode_request(body, None))
    assert words.lower() in str(raised.value).lower(), str(raised.value)


@pytest.mark.parametrize(
    "header_length, body, words",
    [
        ("abc", b"{}", "integer"),
        ("-1", b"{}", "overruns"),
        ("99", b"{}", "overruns"),
        (str(len(_body())), _body() + b"\x00\x01", "not claimed"),
    ],
)
def test_bad_binary_framing(header_length, body, words):
    with pytest.raises(V2Error, match=words):
        decode_request(body, header_length)


def test_bytes_elements_must_match_their_shape():
    blobs = struct.pack("<I", 3) + b"abc" + struct.pack("<I", 1) + b"x"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "B",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(blobs)},
                }
            ]
        }
    ).encode()
    req = decode_request(header + blobs, str(len(header)))
    with pytest.raises(V2Error, match="more than 1 BYTES"):
        req.inputs[0].items()
    short = header.replace(str(len(blobs)).encode(), b"16")  # claims more than follows
    with pytest.raises(V2Error, match="overruns"):
        decode_request(short + blobs, str(len(short)))
    cut = struct.pack("<I", 9) + b"abc"  # an element longer than what is there
    header = header.replace(str(len(blobs)).encode(), str(len(cut)).encode())
    with pytest.raises(V2Error, match="overruns the data"):
        decode_request(header + cut, str(len(header))).inputs[0].items()


def test_json_and_binary_round_trip():
    pixels = np.arange(24, dtype=np.uint8).reshape(1, 2, 4, 3)
    nested = decode_request(_body(inputs=[{**IMAGE, "shape": [1, 2, 4, 3], "data": pixels.tolist()}]), None)
    np.testing.assert_array_equal(nested.inputs[0].array(), pixels)
    header = json.dumps(
        {
            "id": "r",
            "inputs": [
                {**IMAGE, "shape": [1, 2, 4, 3], "data": None, "parameters": {"binary_data_size": 24}}
            ],
            "parameters": {"binary_data_output": True},
            "outputs": [{"name": "MASK"}, {"name": "P", "parameters": {"binary_data": False}}],
        }
    ).encode()
    req = decode_request(header + pixels.tobytes(), str(len(header)))
    np.testing.assert_array_equal(req.inputs[0].array(), pixels)
    assert req.id == "r" and req.outputs == {"MASK": True, "P": False}
    encoded = base64.b64encode(b"\x89PNG").decode()
    blobs = decode_request(
        json.dumps(
            {"inputs": [{"name": "B", "datatype": "BYTES", "shape": [2], "data": [encoded, encoded]}]}
        ).encode(),
        None,
    )
    assert blobs.inputs[0].items() == [b"\x89PNG", b"\x89PNG"]


def test_response_written_into_one_buffer():
    mask = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    probs = np.linspace(0, 1, 12, dtype=np.float32).reshape(1, 2, 2, 3)
    outputs = [
        Output("MASK", "UINT8", mask.shape, True, lambda out: out.__setitem__(..., mask)),
        Output("P", "FP32", probs.shape, False, lambda out: out.__setitem__(..., probs)),
    ]
    body, n = encode_response("m", "1", "id-1", outputs)
    header = json.loads(bytes(body[:n]))
    assert header["id"] == "id-1" and header["outputs"][0]["parameters"]["binary_data_size"] == 6
    np.testing.assert_array_equal(np.frombuffer(bytes(body[n:]), np.uint8).reshape(1, 2, 3), mask)
    np.testing.assert_allclose(
        np.asarray(header["outputs"][1]["data"], np.float32).reshape(probs.shape), probs
    )


@pytest.mark.parametrize("datatype", [d for d in DTYPES])
def test_json_outputs_read_back_exactly_for_every_datatype(datatype):
    """JSON data (written by orjson, a piece at a time) reads back as the same values of the
    output's own type, across piece boundaries; JSON has no NaN: it is written as null."""
    rng = np.random.default_rng(0)
    dtype = DTYPES[datatype]
    if np.issubdtype(dtype, np.floating):
        values = rng.standard_normal(10_000).astype(dtype)
    elif dtype == np.bool_:
        values = rng.integers(0, 2, 10_000).astype(bool)
    else:
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, 10_000, dtype=dtype, endpoint=True)
    outputs = [
        Output("X", datatype, (2, 5_000), False, lambda out: out.__setitem__(..., values.reshape(2, 5_000)))
    ]
    body, n = encode_response("m", "1", None, outputs)
    assert n is None
    data = json.loads(bytes(body))["outputs"][0]["data"]
    np.testing.assert_array_equal(np.asarray(data, dtype=dtype), values)
    if np.issubdtype(dtype, np.floating):
        nan = [Output("Y", datatype, (3,), False, lambda out: out.__setitem__(..., [1.5, np.nan, np.inf]))]
        assert json.loads(bytes(encode_response("m", "1", None, nan)[0]))["outputs"][0]["data"] == [
            1.5,
            None,
            None,
        ]


# -- hypothesis: random documents, datatypes, shapes, binary tails, header lengths ---

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=30,
)
datatypes = st.sampled_from([*DTYPES, "BYTES", "UINT7", ""])
shapes = st.lists(st.one_of(st.integers(0, 4), st.integers(-2, 2**65), st.booleans()), max_size=5)


@st.composite
def tensor_docs(draw):
    doc = {"name": draw(st.sampled_from(["IMAGE", "IMAGE_BYTES", "X", 5])), "datatype": draw(datatypes)}
    doc["shape"] = draw(shapes)
    kind = draw(st.sampled_from(["data", "binary", "both", "none", "junk params"]))
    if kind in ("data", "both"):
        doc["data"] = draw(json_values)
    if kind in ("binary", "both"):
        doc["parameters"] = {"binary_data_size": draw(st.one_of(st.integers(-5, 64), st.text(max_size=3)))}
    if kind == "junk params":
        doc["parameters"] = draw(json_values)
    return doc


@st.composite
def requests(draw):
    doc = {"inputs": draw(st.one_of(st.lists(tensor_docs(), max_size=3), json_values))}
    if draw(st.booleans()):
        doc["outputs"] = draw(
            st.one_of(
                json_values,
                st.lists(
                    st.fixed_dictionaries({"name": st.text(max_size=5)}, optional={"parameters": json_values})
                ),
            )
        )
    if draw(st.booleans()):
        doc["parameters"] = draw(json_values)
    if draw(st.booleans()):
        doc["id"] = draw(json_values)
    header = json.dumps(doc).encode()
    tail = draw(st.binary(max_size=80))
    framing = draw(st.sampled_from(["json", "exact", "random"]))
    if framing == "json":
        return header, None
    length = str(len(header)) if framing == "exact" else draw(st.text(max_size=4))
    return header + tail, length


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests())
def test_any_body_decodes_or_is_a_v2_error(request):
    body, header_length = request
    try:
        req = decode_request(body, header_length)
        _materialise(req)
    except V2Error:
        return
    for tensor in req.inputs:
        value = tensor.items() if tensor.datatype == "BYTES" else tensor.array()
        assert len(value) == tensor.shape[0] if tensor.shape else True


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=300), header_length=st.one_of(st.none(), st.integers(-3, 400).map(str)))
def test_random_bytes_are_v2_errors(blob, header_length):
    with contextlib.suppress(V2Error):
        _materialise(decode_request(blob, header_length))


def test_schema_describes_the_request():
    schema = InferRequestBody.model_json_schema()
    assert schema["required"] == ["inputs"]
    assert "BYTES" in json.dumps(schema) and "binary_data_size" in json.dumps(schema)
