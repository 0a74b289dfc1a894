"""gRPC's ModelInferRequest read at the wire level (service.grpc_codec): what protobuf
decodes, this decodes the same; what would make protobuf's parser take seconds or
hundreds of MiB is refused after a bounded walk; every malformed message is a V2Error."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pb = pytest.importorskip("tritonclient.grpc.service_pb2")

from service.grpc_codec import MAX_FIELDS, decode_infer_request, encode_infer_response  # noqa: E402
from service.v2_codec import Output, V2Error, V2TooLarge  # noqa: E402


def _request(**fields) -> "pb.ModelInferRequest":
    return pb.ModelInferRequest(model_name="tiny", **fields)


def _image(seed: int = 0, shape=(2, 5, 4, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _decode(message) -> tuple:
    return decode_infer_request(message.SerializeToString(), 16)


def test_raw_and_typed_contents_decode_to_the_same_pixels():
    image = _image()
    raw = _request(model_version="7", id="r-1")
    raw.inputs.add(name="IMAGE", datatype="UINT8", shape=list(image.shape))
    raw.raw_input_contents.append(image.tobytes())
    raw.outputs.add(name="MASK")
    raw.parameters["priority"].int64_param = 2
    typed = _request()
    typed.inputs.add(name="IMAGE", datatype="UINT8", shape=list(image.shape)).contents.uint_contents.extend(
        image.ravel().tolist()
    )
    name, version, req = _decode(raw)
    assert (name, version, req.id, req.outputs) == ("tiny", "7", "r-1", {"MASK": True})
    np.testing.assert_array_equal(req.inputs[0].array(), image)
    np.testing.assert_array_equal(_decode(typed)[2].inputs[0].array(), image)


def test_every_uint8_value_and_two_byte_varints_sent_long():
    values = np.arange(256, dtype=np.uint8).repeat(2)
    typed = _request()
    typed.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 1, 512, 1]).contents.uint_contents.extend(
        values.tolist()
    )
    np.testing.assert_array_equal(_decode(typed)[2].inputs[0].array().ravel(), values)
    # 5 as 0x85 0x00 (legal protobuf, longer than it needs to be), 129, 3.
    contents = bytes([0x22, 5, 0x85, 0x00, 0x81, 0x01, 3])  # field 4 (uint_contents), packed, 5 bytes
    described = pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="UINT8", shape=[1, 1, 1, 3])
    tensor = described.SerializeToString() + bytes([0x2A, len(contents)]) + contents  # field 5: contents
    message = bytes([0x2A, len(tensor)]) + tensor  # ModelInferRequest field 5: inputs
    assert decode_infer_request(message, 16)[2].inputs[0].array().ravel().tolist() == [5, 129, 3]


def test_bytes_contents_are_the_images_files():
    typed = _request()
    typed.inputs.add(name="IMAGE_BYTES", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
        [b"png", b"jpeg"]
    )
    assert [bytes(x) for x in _decode(typed)[2].inputs[0].items()] == [b"png", b"jpeg"]


def _slow_for_protobuf() -> dict:
    """Messages that cost protobuf's parser seconds or hundreds of MiB (module docstring)."""
    empty_bytes = _request()
    empty_bytes.inputs.add(name="IMAGE_BYTES", datatype="BYTES", shape=[1]).contents.bytes_contents.extend(
        [b""] * 3_000_000
    )
    empty_inputs = _request()
    for _ in range(400_000):
        empty_inputs.inputs.add()
    unpacked = bytearray()
    for _ in range(200_000):
        unpacked += bytes([0x20, 7])  # uint_contents, one value per field
    described = pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="UINT8", shape=[1, 400, 500, 1])
    tensor = described.SerializeToString() + b"\x2a" + _varint(len(unpacked)) + bytes(unpacked)
    params = _request()
    for i in range(100_000):
        params.parameters[str(i)].bool_param = True
    output_params = _request()  # inside an output: protobuf's part of the message, not walked
    output = output_params.outputs.add(name="MASK")
    for i in range(100_000):
        output.parameters[str(i)].bool_param = True
    dims = _request()
    dims.inputs.add(name="IMAGE", datatype="UINT8").shape.extend([1] * 1_000_000)  # packed: one field
    return {
        "empty bytes_contents": (empty_bytes.SerializeToString(), V2TooLarge, "at most 16 images"),
        "empty inputs": (empty_inputs.SerializeToString(), V2Error, f"more than {MAX_FIELDS} fields"),
        "unpacked numbers": (b"\x2a" + _varint(len(tensor)) + tensor, V2Error, "must be packed"),
        "parameters": (params.SerializeToString(), V2Error, f"more than {MAX_FIELDS} fields"),
        "output parameters": (output_params.SerializeToString(), V2TooLarge, "description"),
        "a million dimensions": (dims.SerializeToString(), V2TooLarge, "description"),
    }


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


@pytest.mark.parametrize(
    "case",
    [
        "empty bytes_contents",
        "empty inputs",
        "unpacked numbers",
        "parameters",
        "output parameters",
        "a million dimensions",
    ],
)
def test_messages_that_would_swamp_protobuf_are_refused_after_a_bounded_walk(case):
    message, error, words = _slow_for_protobuf()[case]
    started = time.process_time()
    with pytest.raises(error, match=words):
        decode_infer_request(message, 16)
    assert time.process_time() - started < 0.5  # protobuf: 0.2-0.7 s; the walk stops at the cap


MALFORMED = {
    "count mismatch": (lambda r: r.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 2, 2, 3]).contents.uint_contents.extend([1] * 11), "11 values"),
    "value over 255": (lambda r: r.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 1, 1, 3]).contents.uint_contents.extend([1, 2, 256]), "0..255"),
    "wrong contents field": (lambda r: r.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 1, 1, 3]).contents.int_contents.extend([1, 2, 3]), "goes in uint_contents"),
    "typed FP32": (lambda r: r.inputs.add(name="IMAGE", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0), "send FP32 as raw_input_contents"),
    "unknown datatype": (lambda r: r.inputs.add(name="IMAGE", datatype="UINT7", shape=[1]), "unknown datatype"),
    "negative dimension": (lambda r: r.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, -2, 2, 3]), "negative"),
    "bytes count": (lambda r: r.inputs.add(name="IMAGE_BYTES", datatype="BYTES", shape=[3]).contents.bytes_contents.append(b"x"), "1 bytes_contents for a shape of 3"),
    "raw count": (lambda r: (r.inputs.add(name="IMAGE", datatype="UINT8", shape=[1]), r.inputs.add(name="IMAGE", datatype="UINT8", shape=[1]), r.raw_input_contents.append(b"\0")), "1 raw_input_contents for 2 inputs"),
    "both contents": (lambda r: (r.inputs.add(name="IMAGE", datatype="UINT8", shape=[1]).contents.uint_contents.append(1), r.raw_input_contents.append(b"\0")), "both"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_messages_say_what_is_wrong(case):
    build, words = MALFORMED[case]
    message = _request()
    build(message)
    with pytest.raises(V2Error, match=words):
        request = _decode(message)[2]
        request.inputs[0].array()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400))
def test_any_bytes_are_a_request_or_a_v2_error(data):
    try:
        _, _, request = decode_infer_request(data, 16)
    except V2Error:
        return
    for tensor in request.inputs:
        with contextlib.suppress(V2Error):
            tensor.items() if tensor.datatype == "BYTES" else tensor.array()


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(min_value=1, max_value=200), flip=st.integers(min_value=0, max_value=255))
def test_a_damaged_real_request_is_a_request_or_a_v2_error(cut, flip):
    message = _request(id="x")
    message.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 4, 4, 3]).contents.uint_contents.extend(
        range(48)
    )
    data = bytearray(message.SerializeToString())
    data[cut % len(data)] ^= flip
    test_any_bytes_are_a_request_or_a_v2_error.hypothesis.inner_test(bytes(data[: len(data) - cut % 7]))


def test_the_response_is_what_protobuf_reads():
    mask = np.arange(24, dtype=np.uint8).reshape(1, 4, 6)
    probs = np.linspace(0, 1, 48, dtype=np.float32).reshape(1, 2, 4, 6)
    outputs = [
        Output("MASK", "UINT8", mask.shape, True, fill=lambda out: np.copyto(out, mask)),
        Output("PROBABILITIES", "FP32", probs.shape, True, fill=lambda out: np.copyto(out, probs)),
        Output("MASK_RLE", "BYTES", (2,), True, items=[b"{}", b'{"a":1}']),
    ]
    response = pb.ModelInferResponse.FromString(encode_infer_response("tiny", "7", "r-1", outputs))
    assert (response.model_name, response.model_version, response.id) == ("tiny", "7", "r-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("MASK", "UINT8", [1, 4, 6]), ("PROBABILITIES", "FP32", [1, 2, 4, 6]), ("MASK_RLE", "BYTES", [2]),
    ]  # fmt: skip
    np.testing.assert_array_equal(
        np.frombuffer(response.raw_output_contents[0], np.uint8).reshape(mask.shape), mask
    )
    np.testing.assert_array_equal(
        np.frombuffer(response.raw_output_contents[1], np.float32).reshape(probs.shape), probs
    )
    assert response.raw_output_contents[2] == b'\x02\0\0\0{}\x07\0\0\0{"a":1}'


def test_every_error_carries_its_grpc_code():
    """One map, on the error classes: each HTTP status beside the gRPC code it is answered with."""
    import grpc

    from service import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ApiError)]
    assert len(classes) > 15
    for cls in classes:
        assert isinstance(grpc.StatusCode[cls.grpc_code], grpc.StatusCode), cls
    assert (
        errors.InvalidRequest.grpc_code == "INVALID_ARGUMENT" and errors.Overloaded.grpc_code == "UNAVAILABLE"
    )
