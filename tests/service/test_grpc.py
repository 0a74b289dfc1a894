"""The Open Inference Protocol over gRPC: tritonclient.grpc against a real
``python -m service`` with GRPC_PORT set."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

import model
from benchmarks.client import metric_samples
from benchmarks.servers import free_port
from model import ModelConfig
from tests.conftest import make_net
from tests.real_parts import missing
from tests.service.conftest import ServerProcess, decode_mask, png_bytes, random_image

KEY = "grpc-key"
AUTH = {"authorization": f"Bearer {KEY}"}


def grpcclient():
    try:
        import tritonclient.grpc as client
    except ImportError:
        missing("tritonclient[grpc]", "pip install 'tritonclient[grpc]' (a dev dependency)")
    return client


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    port = free_port()
    proc = ServerProcess(tiny_artifact, tmp_path_factory.mktemp("grpc"), CHANSEG_GRPC_PORT=str(port), CHANSEG_API_KEY=KEY)
    try:
        proc.wait_ready()
        proc.grpc_url = f"127.0.0.1:{port}"
        yield proc
    finally:
        proc.stop()


def _status(exc) -> str:
    return str(exc.status())


@pytest.mark.real_part("tritonclient")
def test_health_metadata_and_the_api_key(server):
    g = grpcclient()
    client = g.InferenceServerClient(server.grpc_url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "7")
    with pytest.raises(g.InferenceServerException) as err:
        client.get_model_metadata("tiny")
    assert _status(err.value) == "StatusCode.UNAUTHENTICATED"
    meta = client.get_model_metadata("tiny", headers=AUTH, as_json=True)
    assert meta["versions"] == ["7"]
    assert [o["name"] for o in meta["outputs"]] == ["MASK", "PROBABILITIES", "CONFIDENCE", "MASK_RLE"]
    with pytest.raises(g.InferenceServerException) as err:
        client.get_model_metadata("other", headers=AUTH)
    assert _status(err.value) == "StatusCode.NOT_FOUND"


@pytest.mark.real_part("tritonclient")
def test_masks_equal_the_http_apis(server, tiny_segmenter):
    g = grpcclient()
    client = g.InferenceServerClient(server.grpc_url)
    images = np.stack([random_image(41, 256, 256), random_image(42, 256, 256)])
    inp = g.InferInput("IMAGE", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    outputs = [g.InferRequestedOutput(name) for name in ("MASK", "PROBABILITIES", "MASK_RLE")]
    result = client.infer("tiny", [inp], outputs=outputs, headers=AUTH, request_id="r-1")
    masks = result.as_numpy("MASK")
    assert masks.shape == (2, 256, 256) and result.get_response().id == "r-1"
    for mask, image in zip(masks, images):
        r = httpx.post(server.url + "/predict?format=png", files={"file": ("a.png", png_bytes(image))}, headers=AUTH)
        np.testing.assert_array_equal(mask, decode_mask(r.content))
    np.testing.assert_allclose(result.as_numpy("PROBABILITIES")[0], tiny_segmenter.predict_proba(images[0]), atol=1e-5)
    assert result.as_numpy("MASK_RLE").shape == (2,)

    encoded = g.InferInput("IMAGE_BYTES", [1], "BYTES")
    encoded.set_data_from_numpy(np.array([png_bytes(images[0])], dtype=np.object_))
    result = client.infer("tiny", [encoded], headers=AUTH, model_version="7")
    np.testing.assert_array_equal(result.as_numpy("MASK")[0], masks[0])
    samples = metric_samples(httpx.get(server.url + "/metrics").text)
    assert any(name == "chanseg_requests_total" and dict(labels).get("endpoint") == "grpc_infer" for name, labels in samples)


def _raw_call(server, inputs, raw, outputs=()):
    """A ModelInferRequest built by hand (what tritonclient would never send)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="tiny")
    for name, datatype, shape in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend(raw)
    for name in outputs:
        request.outputs.add(name=name)
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=30)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()
    return "OK", ""


MALFORMED = {
    "wrong datatype": ([("IMAGE", "FP32", [1, 16, 16, 3])], [b"\0" * (16 * 16 * 3 * 4)], (), "UINT8"),
    "short data": ([("IMAGE", "UINT8", [1, 16, 16, 3])], [b"\0" * 10], (), "bytes of data"),
    "wrong shape": ([("IMAGE", "UINT8", [16, 16, 3])], [b"\0" * (16 * 16 * 3)], (), "shape"),
    "two inputs": ([("IMAGE", "UINT8", [1, 16, 16, 3])] * 2, [b"\0" * (16 * 16 * 3)] * 2, (), "exactly one"),
    "unknown input": ([("PIXELS", "UINT8", [1, 16, 16, 3])], [b"\0" * (16 * 16 * 3)], (), "unknown input"),
    "unknown output": ([("IMAGE", "UINT8", [1, 16, 16, 3])], [b"\0" * (16 * 16 * 3)], ("LOGITS",), "unknown output"),
    "not an image": ([("IMAGE_BYTES", "BYTES", [1])], [b"\x04\0\0\0nope"], (), "IMAGE_BYTES[0]"),
    "bad bytes framing": ([("IMAGE_BYTES", "BYTES", [1])], [b"\xff\0\0\0ab"], (), "overruns"),
    "too small": ([("IMAGE", "UINT8", [1, 2, 2, 3])], [b"\0" * 12], (), "small"),
}


@pytest.mark.real_part("tritonclient")
@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_requests_are_invalid_argument(server, case):
    grpcclient()
    inputs, raw, outputs, words = MALFORMED[case]
    code, details = _raw_call(server, inputs, raw, outputs)
    assert code == "INVALID_ARGUMENT" and words in details, (code, details)
    assert httpx.get(server.url + "/readyz").status_code == 200


def _slow_server(tmp_path, **env) -> ServerProcess:
    """A real server with gRPC, on a 256x256 network (~30 ms an image here): calls overlap."""
    slow = tmp_path / "slow.pt"
    model.export_torchscript(make_net(ModelConfig(widths=(8, 16, 32), input_size=(256, 256), name="slow")), slow)
    port = free_port()
    proc = ServerProcess(str(slow), tmp_path, CHANSEG_GRPC_PORT=str(port), **env)
    proc.grpc_url = f"127.0.0.1:{port}"
    try:
        proc.wait_ready()
    except BaseException:
        proc.stop()
        raise
    return proc


def _infer(target: str, image: np.ndarray):
    """One gRPC infer of ``image`` on the slow model: the mask's shape, or the status it failed with."""
    g = grpcclient()
    client = g.InferenceServerClient(target)
    inp = g.InferInput("IMAGE", list(image.shape), "UINT8")
    inp.set_data_from_numpy(image)
    try:
        return client.infer("slow", [inp]).as_numpy("MASK").shape
    except g.InferenceServerException as exc:
        return _status(exc)


@pytest.mark.real_part("tritonclient")
def test_overload_is_unavailable(tmp_path):
    proc = _slow_server(tmp_path, CHANSEG_MAX_QUEUE="2", CHANSEG_MAX_BATCH_SIZE="1")
    try:
        image = random_image(43, 256, 256)[None]
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda _: _infer(proc.grpc_url, image), range(32)))
        assert set(codes) == {(1, 256, 256), "StatusCode.UNAVAILABLE"}, codes
        assert httpx.get(proc.url + "/readyz").status_code == 200
    finally:
        proc.stop()


@pytest.mark.real_part("tritonclient")
def test_sigterm_drains_grpc_calls_in_flight(tmp_path):
    import signal
    import time

    proc = _slow_server(tmp_path, CHANSEG_MAX_BATCH_DELAY_MS="5")
    try:
        image = random_image(44, 256, 256)[None]
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(_infer, proc.grpc_url, image) for _ in range(12)]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # SIGTERM once the calls are queued in the server
                samples = metric_samples(httpx.get(proc.url + "/metrics").text)
                depth = samples.get(("chanseg_queue_depth", ()), 0)
                if depth >= 4:
                    break
                time.sleep(0.005)
            assert depth >= 4, "the calls never queued together"
            accepted = depth + samples.get(("chanseg_images_total", ()), 0)  # at least: queued or computed
            proc.proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=60) for f in futures]
        # Accepted work finishes; a call that had not reached the queue by then is refused
        # as a draining server refuses new calls (how many did depends on timing).
        assert results.count((1, 256, 256)) >= accepted, (accepted, results)
        assert set(results) <= {(1, 256, 256), "StatusCode.UNAVAILABLE"}, results
        assert proc.proc.wait(30) == 0  # exit 0: everything accepted was finished within the budget
    finally:
        proc.stop()
