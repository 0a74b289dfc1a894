"""Random and mutated image bytes at /predict (PNG, JPEG, WebP, TIFF, GIF, BMP),
and random v2 bodies: only 200 or a 4xx, never a 5xx, and the server keeps serving."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.testclient import TestClient

from service.app import create_app
from tests.service.conftest import make_settings, png_bytes, random_image

SEED_PNG = png_bytes(random_image(0, 24, 20))


def _encode(fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(random_image(1, 24, 20)).save(buf, format=fmt, **save)
    return buf.getvalue()


SEEDS = [SEED_PNG] + [
    _encode(fmt, **save)
    for fmt, save in [
        ("JPEG", {"quality": 80}),
        ("WEBP", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("GIF", {}),
        ("BMP", {}),
    ]
]


@pytest.fixture(scope="module")
def client(tiny_artifact):
    app = create_app(make_settings(tiny_artifact, max_image_pixels=1_000_000))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _ihdr(width: int, height: int, depth: int, colour: int) -> bytes:
    data = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return struct.pack(">I", 13) + b"IHDR" + data + struct.pack(">I", zlib.crc32(b"IHDR" + data))


mutated = st.one_of(
    st.binary(max_size=2000),
    st.integers(0, len(SEED_PNG)).map(lambda n: SEED_PNG[:n]),
    st.lists(st.tuples(st.integers(0, len(SEED_PNG) - 1), st.integers(0, 7)), min_size=1, max_size=20).map(
        lambda flips: bytes(
            b ^ (1 << bit) if i in dict(flips) and dict(flips)[i] == bit else b
            for i, b in enumerate(SEED_PNG)
            for bit in [dict(flips).get(i, -1)]
        )
    ),
    st.tuples(
        st.integers(0, 2**31 - 1),
        st.integers(0, 2**31 - 1),
        st.sampled_from([1, 2, 4, 8, 16]),
        st.sampled_from([0, 2, 3, 4, 6]),
    ).map(lambda t: SEED_PNG[:8] + _ihdr(*t) + SEED_PNG[33:]),
    st.tuples(
        st.sampled_from(SEEDS),
        st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 255)), max_size=8),
        st.integers(1, 5000),
    ).map(lambda t: _flip(*t)),
)


def _flip(seed: bytes, flips: list, cut: int) -> bytes:
    data = bytearray(seed[:cut])
    for index, value in flips:
        data[index % len(data)] ^= value
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=mutated, content_type=st.sampled_from(["image/png", "image/jpeg", "image/gif"]))
def test_mutated_bytes_never_5xx(client, body, content_type):
    r = client.post("/predict", content=body, headers={"content-type": content_type})
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
    assert "detail" in r.json() or r.status_code == 200


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.tuples(st.sampled_from(["file", "x"]), st.binary(max_size=300)), max_size=5))
def test_random_multipart_never_5xx(client, parts):
    files = [(name, ("f.png", data, "image/png")) for name, data in parts]
    r = client.post("/predict", files=files) if files else client.post("/predict", data={"a": "b"})
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)


v2_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=20,
)
v2_inputs = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["IMAGE", "IMAGE_BYTES", "X"]),
        "datatype": st.sampled_from(["UINT8", "BYTES", "FP32", "INT64", "NOPE"]),
        "shape": st.lists(st.integers(-1, 2**64), max_size=5),
    },
    optional={"data": v2_values, "parameters": v2_values},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    doc=st.fixed_dictionaries(
        {"inputs": st.one_of(st.lists(v2_inputs, max_size=2), v2_values)},
        optional={"outputs": v2_values, "parameters": v2_values, "id": v2_values},
    ),
    tail=st.binary(max_size=64),
    framing=st.sampled_from([None, "exact", "junk"]),
)
def test_random_v2_bodies_never_5xx(client, doc, tail, framing):
    header = json.dumps(doc).encode()
    headers = {}
    if framing == "exact":
        headers["inference-header-content-length"] = str(len(header))
    elif framing == "junk":
        headers["inference-header-content-length"] = "x9"
    r = client.post("/v2/models/tiny/infer", content=header + (tail if framing else b""), headers=headers)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.status_code == 200 or "error" in r.json()


def test_still_serving_after_fuzzing(client):
    assert client.post("/predict", content=SEED_PNG, headers={"content-type": "image/png"}).status_code == 200
