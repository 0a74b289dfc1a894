"""Open Inference Protocol v2: tritonclient against a real server, raw malformed requests in-process."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import numpy as np
import pytest

from testbed.metrics import metric_samples
from tests.real_parts import missing
from tests.service.conftest import SHARED_AUTH, make_settings, png_bytes, random_image, serve
from tests.service.test_app import files


@pytest.fixture
def server(shared_server):
    """The suite's one real server (tests/service/conftest.py), behind its API key."""
    return shared_server


def triton():
    """tritonclient's HTTP client: a real v2 client, written elsewhere (only these tests need it)."""
    try:
        import tritonclient.http as http
    except ImportError:
        missing("tritonclient[http]", "pip install 'tritonclient[http]' (a dev dependency)")
    return http


def _infer_pixels(server, images: np.ndarray, outputs: list, binary: bool, **options):
    """tritonclient's infer of UINT8 ``images`` as IMAGE, asking for ``outputs`` (binary or JSON)."""
    httpclient = triton()
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    inp = httpclient.InferInput("IMAGE", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images, binary_data=binary)
    requested = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    return client.infer("tiny", [inp], outputs=requested, headers=dict(SHARED_AUTH), **options)


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_tritonclient_sends_a_256x256_image_as_json(server):
    """Issue 34: a KServe user's first request, the model's own input size as a JSON tensor
    (196,608 values), was 413 "over the limit of 131072 for JSON tensors"."""
    images = np.random.default_rng(34).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    result = _infer_pixels(server, images, ["MASK"], binary=False)
    mask = result.as_numpy("MASK")
    assert mask.shape == (1, 256, 256) and mask.max() < 4
    binary = _infer_pixels(server, images, ["MASK"], binary=True).as_numpy("MASK")
    assert np.array_equal(mask, binary)  # the same image, whichever way it came


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_tritonclient_metadata_and_health(server):
    httpclient = triton()
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "7")  # open over HTTP
    assert not client.is_model_ready("other")
    meta = client.get_model_metadata("tiny", headers=dict(SHARED_AUTH))
    assert meta["name"] == "tiny" and meta["versions"] == ["7"]
    assert {(i["name"], i["datatype"]) for i in meta["inputs"]} == {
        ("IMAGE", "UINT8"),
        ("IMAGE_BYTES", "BYTES"),
    }
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("MASK", "UINT8", [-1, -1, -1]),
        ("PROBABILITIES", "FP32", [-1, 4, -1, -1]),
        ("CONFIDENCE", "UINT8", [-1, -1, -1]),
        ("MASK_RLE", "BYTES", [-1]),
    ]
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_uint8_infer(server, tiny_segmenter, binary):
    images = np.stack([random_image(1, 40, 30), random_image(2, 40, 30)])
    result = _infer_pixels(server, images, ["MASK"], binary, request_id="req-1")
    masks = result.as_numpy("MASK")
    assert masks.shape == (2, 40, 30) and masks.dtype == np.uint8
    for mask, image in zip(masks, images):
        np.testing.assert_array_equal(mask, tiny_segmenter.predict(image))
    assert result.get_response()["id"] == "req-1"
    assert result.as_numpy("PROBABILITIES") is None  # only when asked for


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_tritonclient_bytes_input_and_both_outputs(server, tiny_segmenter):
    httpclient = triton()
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    image = random_image(3, 50, 50)
    inp = httpclient.InferInput("IMAGE_BYTES", [1], "BYTES")
    inp.set_data_from_numpy(np.array([png_bytes(image)], dtype=np.object_), binary_data=True)
    outputs = [httpclient.InferRequestedOutput("MASK"), httpclient.InferRequestedOutput("PROBABILITIES")]
    result = client.infer("tiny", [inp], outputs=outputs, model_version="7", headers=dict(SHARED_AUTH))
    mask, probs = result.as_numpy("MASK"), result.as_numpy("PROBABILITIES")
    np.testing.assert_array_equal(mask[0], tiny_segmenter.predict(image))
    assert probs.shape == (1, 4, 50, 50) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs[0], tiny_segmenter.predict_proba(image), atol=1e-5)


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_confidence_and_rle_outputs(server, tiny_segmenter, binary):
    from pycocotools import mask as coco

    images = np.stack([random_image(6, 70, 90), random_image(7, 70, 90)])
    wanted = ["MASK", "CONFIDENCE", "MASK_RLE"]
    result = _infer_pixels(server, images, wanted, binary)
    masks, confidence, rles = (result.as_numpy(name) for name in wanted)
    assert confidence.shape == (2, 70, 90) and confidence.dtype == np.uint8 and rles.shape == (2,)
    classes = tiny_segmenter.config.class_names
    for i, image in enumerate(images):
        probs = tiny_segmenter.predict_proba(image)
        np.testing.assert_allclose(confidence[i], probs.max(0) * 255, atol=1.01)  # rounded to 8 bits
        rebuilt = np.zeros_like(masks[i])
        for name, rle in json.loads(rles[i]).items():
            rebuilt[coco.decode({"size": rle["size"], "counts": rle["counts"].encode()}) == 1] = (
                classes.index(name)
            )
        np.testing.assert_array_equal(rebuilt, masks[i])
        np.testing.assert_array_equal(masks[i], tiny_segmenter.predict(image))


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_tritonclient_defaults_binary_on(server, tiny_segmenter):
    httpclient = triton()
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    image = random_image(4, 24, 24)[None]
    inp = httpclient.InferInput("IMAGE", list(image.shape), "UINT8")
    inp.set_data_from_numpy(image)
    result = client.infer("tiny", [inp], headers=dict(SHARED_AUTH))
    np.testing.assert_array_equal(result.as_numpy("MASK")[0], tiny_segmenter.predict(image[0]))


def _json(inputs, **extra):
    return json.dumps({"inputs": inputs, **extra}).encode()


IMG = random_image(5, 16, 16)
GOOD_INPUT = {"name": "IMAGE", "datatype": "UINT8", "shape": [1, 16, 16, 3], "data": IMG.ravel().tolist()}
MALFORMED = {
    "not json": (b"{nope", {}, 400, "JSON"),
    "no inputs": (b'{"inputs": []}', {}, 400, "inputs"),
    "wrong datatype": (
        _json([{**GOOD_INPUT, "datatype": "FP32", "data": [0.5] * IMG.size}]),
        {},
        400,
        "UINT8",
    ),
    "wrong shape": (_json([{**GOOD_INPUT, "shape": [1, 16, 16]}]), {}, 400, "shape"),
    "shape/data mismatch": (_json([{**GOOD_INPUT, "shape": [1, 16, 17, 3]}]), {}, 400, "values"),
    "wrong input name": (_json([{**GOOD_INPUT, "name": "PIXELS"}]), {}, 400, "unknown input"),
    "wrong output name": (_json([GOOD_INPUT], outputs=[{"name": "LOGITS"}]), {}, 400, "unknown output"),
    "value out of range": (_json([{**GOOD_INPUT, "data": [300] * IMG.size}]), {}, 400, "range"),
    "two inputs": (_json([GOOD_INPUT, GOOD_INPUT]), {}, 400, "exactly one"),
    "byte count": (
        _json(
            [
                {
                    "name": "IMAGE",
                    "datatype": "UINT8",
                    "shape": [1, 16, 16, 3],
                    "parameters": {"binary_data_size": 10},
                }
            ]
        )
        + b"\0" * 10,
        "header",
        400,
        "bytes",
    ),
    "header overruns body": (b'{"inputs": []}', {"inference-header-content-length": "500"}, 400, "overruns"),
    "bad base64": (
        _json([{"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]),
        {},
        400,
        "base64",
    ),
    # the issue's: each was a 500 with a traceback
    "shape product overflows int64": (
        _json([{**GOOD_INPUT, "shape": [2**40, 2**40, 2**40, 3]}]),
        {},
        413,
        "pixels",
    ),
    "integer beyond int64": (_json([{**GOOD_INPUT, "data": [2**70] * IMG.size}]), {}, 400, "integers"),
    "deeply nested data": (
        _json([{**GOOD_INPUT, "data": json.loads("[" * 300 + "1" + "]" * 300)}]),
        {},
        400,
        "data",
    ),
    "outputs is a number": (_json([GOOD_INPUT], outputs=5), {}, 400, "outputs"),
    # issue 31: a zero-sized dimension was a 422, unlike every other malformed request
    "no image (N = 0)": (_json([{**GOOD_INPUT, "shape": [0, 16, 16, 3], "data": []}]), {}, 400, "no image"),
    "no encoded image": (
        _json([{"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [0], "data": []}]),
        {},
        400,
        "no image",
    ),
    "zero height": (_json([{**GOOD_INPUT, "shape": [1, 0, 16, 3], "data": []}]), {}, 400, "too small"),
    "parameters not an object": (_json([GOOD_INPUT], parameters=[1]), {}, 400, "parameters"),
    "output parameters not an object": (
        _json([GOOD_INPUT], outputs=[{"name": "MASK", "parameters": 7}]),
        {},
        400,
        "parameters",
    ),
    "undecodable image bytes": (
        _json(
            [
                {
                    "name": "IMAGE_BYTES",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [base64.b64encode(b"hi").decode()],
                }
            ]
        ),
        {},
        400,
        "decodable",
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_v2_requests_are_400_with_error(tiny_artifact, case):
    body, headers, status, words = MALFORMED[case]
    if headers == "header":
        headers = {"inference-header-content-length": str(len(body) - 10)}
    async with serve(make_settings(tiny_artifact)) as client:
        r = await client.post("/v2/models/tiny/infer", content=body, headers=headers)
        good = await client.post("/v2/models/tiny/infer", content=_json([GOOD_INPUT]))
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"].lower()
    assert good.status_code == 200 and good.json()["outputs"][0]["shape"] == [1, 16, 16]


@pytest.mark.anyio
async def test_unknown_model_or_version_is_404(tiny_artifact):
    async with serve(make_settings(tiny_artifact)) as client:
        results = [
            await client.post("/v2/models/nope/infer", content=_json([GOOD_INPUT])),
            await client.post("/v2/models/tiny/versions/8/infer", content=_json([GOOD_INPUT])),
            await client.get("/v2/models/nope"),
            await client.get("/v2/models/tiny/versions/8/ready"),
        ]
    assert [r.status_code for r in results] == [404] * 4
    assert all("error" in r.json() for r in results)


@pytest.mark.anyio
async def test_json_nested_data_binary_output_and_api_key(tiny_artifact, tiny_segmenter):
    nested = {"name": "IMAGE", "datatype": "UINT8", "shape": [1, 16, 16, 3], "data": IMG[None].tolist()}
    body = _json([nested], id="n1", parameters={"binary_data_output": True})
    async with serve(make_settings(tiny_artifact, api_key="k")) as client:
        denied = await client.post("/v2/models/tiny/infer", content=body)
        r = await client.post("/v2/models/tiny/infer", content=body, headers={"authorization": "Bearer k"})
        live = await client.get("/v2/health/live")
    assert denied.status_code == 401 and "error" in denied.json()
    assert live.status_code == 200
    n = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:n])
    assert header["id"] == "n1" and header["outputs"][0]["parameters"]["binary_data_size"] == 256
    mask = np.frombuffer(r.content[n:], np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(mask, tiny_segmenter.predict(IMG))


@pytest.mark.anyio
async def test_v2_and_predict_share_batches(tiny_artifact):
    async with serve(make_settings(tiny_artifact, max_batch_size=8, max_batch_delay_ms=100)) as client:
        v2 = [client.post("/v2/models/tiny/infer", content=_json([GOOD_INPUT])) for _ in range(4)]
        predict = [client.post("/predict", files=files(random_image(i))) for i in range(4)]
        responses = await asyncio.gather(*v2, *predict)
        samples = metric_samples((await client.get("/metrics")).text)
    assert all(r.status_code == 200 for r in responses)
    assert samples[("chanseg_batch_size_sum", ())] == 8
    assert samples[("chanseg_batch_size_count", ())] <= 2  # both endpoints' images in the same batch(es)
    assert samples[("chanseg_requests_total", (("endpoint", "v2_infer"), ("status", "200")))] == 4
    assert samples[("chanseg_requests_total", (("endpoint", "predict"), ("status", "200")))] == 4


def test_binary_bytes_codec_round_trip():
    from service.v2_codec import decode_request

    blobs = [b"abc", b"", b"\x00\xff"]
    data = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    header = _json(
        [
            {
                "name": "IMAGE_BYTES",
                "datatype": "BYTES",
                "shape": [3],
                "parameters": {"binary_data_size": len(data)},
            }
        ]
    )
    req = decode_request(header + data, str(len(header)))
    assert [bytes(b) for b in req.inputs[0].items()] == blobs


@pytest.mark.anyio
async def test_v2_limits_are_413_with_what_to_send_instead(tiny_artifact):
    big = np.zeros((1, 300, 300, 3), np.uint8)
    json_image = _json([{**GOOD_INPUT, "shape": list(big.shape), "data": big.ravel().tolist()}])
    settings = make_settings(tiny_artifact, max_json_bytes=1_000_000, memory_budget_mb=64)
    image = png_bytes(np.full((3000, 2000, 3), 40, np.uint8))
    probs_json = _json(
        [
            {
                "name": "IMAGE_BYTES",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(image).decode()],
            }
        ],
        outputs=[{"name": "PROBABILITIES"}],
    )
    async with serve(settings) as client:
        over_json = await client.post("/v2/models/tiny/infer", content=b"{" + b" " * 1_000_001 + b"}")
        values = await client.post("/v2/models/tiny/infer", content=json_image)
        probs = await client.post("/v2/models/tiny/infer", content=probs_json)
        good = await client.post("/v2/models/tiny/infer", content=_json([GOOD_INPUT]))
    assert over_json.status_code == 413 and "MAX_JSON_BYTES" in over_json.json()["error"]
    assert "binary" in over_json.json()["error"]
    assert values.status_code == 200, (
        values.text
    )  # 270,000 values: once 413 (over 131,072), now under the bytes limit
    assert probs.status_code == 413, probs.text
    assert "PROBABILITIES" in probs.json()["error"] and "ask for MASK only" in probs.json()["error"]
    assert good.status_code == 200 and int(good.headers["content-length"]) == len(good.content)


@pytest.mark.anyio
async def test_schema_of_v2_infer_is_a_real_one(tiny_artifact):
    async with serve(make_settings(tiny_artifact)) as client:
        schema = (await client.get("/openapi.json")).json()
    body = schema["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    tensor = body["properties"]["inputs"]["items"]
    assert body["required"] == ["inputs"] and "$ref" not in json.dumps(body)
    assert set(tensor["required"]) == {"name", "shape", "datatype"}
    assert "UINT8" in tensor["properties"]["datatype"]["enum"]
