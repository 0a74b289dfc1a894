"""The Open Inference Protocol over gRPC: tritonclient.grpc against a real
``python -m service`` with GRPC_PORT set."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import model
from model import ModelConfig
from testbed.metrics import metric_samples
from testbed.processes import free_port
from tests.conftest import make_net
from tests.real_parts import missing
from tests.service.conftest import (
    SHARED_AUTH,
    SHARED_KEY,
    ServerProcess,
    SlowSegmenter,
    decode_mask,
    make_settings,
    png_bytes,
    random_image,
    serve,
)

KEY, AUTH = SHARED_KEY, SHARED_AUTH  # tritonclient adds its own headers to the dict it is given: pass copies


def grpcclient():
    try:
        import tritonclient.grpc as client
    except ImportError:
        missing("tritonclient[grpc]", "pip install 'tritonclient[grpc]' (a dev dependency)")
    return client


@pytest.fixture
def server(shared_server):
    """The suite's one real server (tests/service/conftest.py): HTTP, gRPC on, an API key."""
    return shared_server


def _status(exc) -> str:
    return str(exc.status())


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_health_metadata_and_the_api_key(server):
    g = grpcclient()
    client = g.InferenceServerClient(server.grpc_url)
    assert client.is_server_live() and client.is_server_ready()  # open: they read no message
    with pytest.raises(g.InferenceServerException) as err:
        client.is_model_ready("tiny")  # its message is read: behind the key, unlike its HTTP form
    assert _status(err.value) == "StatusCode.UNAUTHENTICATED"
    assert client.is_model_ready("tiny", headers=dict(AUTH)) and client.is_model_ready(
        "tiny", "7", headers=dict(AUTH)
    )
    with pytest.raises(g.InferenceServerException) as err:
        client.get_model_metadata("tiny")
    assert _status(err.value) == "StatusCode.UNAUTHENTICATED"
    meta = client.get_model_metadata("tiny", headers=dict(AUTH), as_json=True)
    assert meta["versions"] == ["7"]
    assert [o["name"] for o in meta["outputs"]] == ["MASK", "PROBABILITIES", "CONFIDENCE", "MASK_RLE"]
    with pytest.raises(g.InferenceServerException) as err:
        client.get_model_metadata("other", headers=dict(AUTH))
    assert _status(err.value) == "StatusCode.NOT_FOUND"


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_masks_equal_the_http_apis(server, tiny_segmenter):
    g = grpcclient()
    client = g.InferenceServerClient(server.grpc_url)
    images = np.stack([random_image(41, 256, 256), random_image(42, 256, 256)])
    inp = g.InferInput("IMAGE", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    outputs = [g.InferRequestedOutput(name) for name in ("MASK", "PROBABILITIES", "MASK_RLE")]
    result = client.infer("tiny", [inp], outputs=outputs, headers=dict(AUTH), request_id="r-1")
    masks = result.as_numpy("MASK")
    assert masks.shape == (2, 256, 256) and result.get_response().id == "r-1"
    for mask, image in zip(masks, images):
        r = httpx.post(
            server.url + "/predict?format=png",
            files={"file": ("a.png", png_bytes(image))},
            headers=dict(AUTH),
        )
        np.testing.assert_array_equal(mask, decode_mask(r.content))
    np.testing.assert_allclose(
        result.as_numpy("PROBABILITIES")[0], tiny_segmenter.predict_proba(images[0]), atol=1e-5
    )
    assert result.as_numpy("MASK_RLE").shape == (2,)

    encoded = g.InferInput("IMAGE_BYTES", [1], "BYTES")
    encoded.set_data_from_numpy(np.array([png_bytes(images[0])], dtype=np.object_))
    result = client.infer("tiny", [encoded], headers=dict(AUTH), model_version="7")
    np.testing.assert_array_equal(result.as_numpy("MASK")[0], masks[0])
    samples = metric_samples(httpx.get(server.url + "/metrics").text)
    assert any(
        name == "chanseg_requests_total" and dict(labels).get("endpoint") == "grpc_infer"
        for name, labels in samples
    )


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
    "short data": ([("IMAGE", "UINT8", [1, 16, 16, 3])], [b"\0" * 10], (), "10 bytes for shape"),
    "wrong shape": ([("IMAGE", "UINT8", [16, 16, 3])], [b"\0" * (16 * 16 * 3)], (), "shape"),
    "two inputs": ([("IMAGE", "UINT8", [1, 16, 16, 3])] * 2, [b"\0" * (16 * 16 * 3)] * 2, (), "exactly one"),
    "unknown input": ([("PIXELS", "UINT8", [1, 16, 16, 3])], [b"\0" * (16 * 16 * 3)], (), "unknown input"),
    "unknown output": (
        [("IMAGE", "UINT8", [1, 16, 16, 3])],
        [b"\0" * (16 * 16 * 3)],
        ("LOGITS",),
        "unknown output",
    ),
    "not an image": ([("IMAGE_BYTES", "BYTES", [1])], [b"\x04\0\0\0nope"], (), "IMAGE_BYTES[0]"),
    "bad bytes framing": ([("IMAGE_BYTES", "BYTES", [1])], [b"\xff\0\0\0ab"], (), "overruns"),
    "too small": ([("IMAGE", "UINT8", [1, 2, 2, 3])], [b"\0" * 12], (), "small"),
}


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_requests_are_invalid_argument(server, case):
    grpcclient()
    inputs, raw, outputs, words = MALFORMED[case]
    code, details = _raw_call(server, inputs, raw, outputs)
    assert code == "INVALID_ARGUMENT" and words in details, (code, details)
    assert httpx.get(server.url + "/readyz").status_code == 200
    samples = metric_samples(httpx.get(server.url + "/metrics").text)
    assert (
        samples[("chanseg_requests_total", (("endpoint", "grpc_infer"), ("status", "400")))] >= 1
    )  # as HTTP counts it


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_a_huge_name_gets_a_short_message_and_a_huge_description_is_refused(server):
    code, details = _raw_call(server, [("N" * 60_000, "UINT8", [1, 16, 16, 3])], [bytes(768)])
    assert code == "INVALID_ARGUMENT" and "unknown input" in details and len(details) <= 1000
    code, details = _raw_call(server, [("N" * 70_000, "UINT8", [1, 16, 16, 3])], [bytes(768)])
    assert code == "RESOURCE_EXHAUSTED" and "description" in details


def _slow_server(tmp_path, **env) -> ServerProcess:
    """A real server with gRPC, on a 256x256 network (~30 ms an image here): calls overlap."""
    slow = tmp_path / "slow.pt"
    model.export_torchscript(
        make_net(ModelConfig(widths=(8, 16, 32), input_size=(256, 256), name="slow")), slow
    )
    proc = ServerProcess(str(slow), tmp_path, grpc=True, **env)
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def _call(target: str, message: bytes, metadata=(), method: str = "ModelInfer"):
    """One call with serialized ``message``; (status name, details, response bytes, trailing metadata)."""
    import grpc

    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        try:
            response, call = stub.with_call(message, metadata=metadata, timeout=120)
            return "OK", "", response, dict(call.trailing_metadata())
        except grpc.RpcError as exc:
            return exc.code().name, exc.details(), b"", {}


class _Healthz:
    """The slowest /healthz answer while in use (polled every 20 ms)."""

    def __init__(self, url: str) -> None:
        import threading

        self.url, self.worst, self._stop = url, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import time

        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                assert client.get(self.url + "/healthz").status_code == 200
                self.worst = max(self.worst, time.perf_counter() - started)
                time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_calls_without_the_key_are_refused_before_their_message_is_read(server):
    """Issue 31: 16 such calls of 30 MiB took a server from 500 MiB to 1.3 GiB."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 2000, 5000, 3])
    request.raw_input_contents.append(b"\0" * (30 << 20))
    message = request.SerializeToString()
    before = _rss(server.proc.pid)
    with ThreadPoolExecutor(16) as pool, _Healthz(server.url) as health:
        results = list(pool.map(lambda _: _call(server.grpc_url, message), range(16)))
    grown = _rss(server.proc.pid) - before
    print(
        f"16 unauthenticated 30 MiB calls: RSS +{grown / 2**20:.0f} MiB, /healthz worst {health.worst * 1000:.0f} ms"
    )
    assert {r[:2] for r in results} == {("UNAUTHENTICATED", "missing or invalid API key")}
    assert grown < 32 << 20, f"the server grew by {grown / 2**20:.0f} MiB reading messages it refuses"
    # Every other keyed call is refused unread too; the open ones answer without a key.
    assert _call(server.grpc_url, b"", method="ModelMetadata")[0] == "UNAUTHENTICATED"
    assert _call(server.grpc_url, b"", method="RepositoryIndex")[0] == "UNAUTHENTICATED"
    assert _call(server.grpc_url, b"", method="ServerLive")[0] == "OK"


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_calls_chanseg_does_not_implement_say_so(server):
    code, details, _, _ = _call(server.grpc_url, b"", tuple(AUTH.items()), method="TraceSetting")
    assert code == "UNIMPLEMENTED" and "chanseg does not implement TraceSetting" in details


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_large_typed_contents_are_converted_off_the_event_loop(server):
    """Issue 31: 8 keyed calls of 15 M uint_contents stalled /healthz 5.6-8.8 s (a
    readiness probe times out at 1 s); each is now an image like any other."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="tiny")
    values = np.random.default_rng(5).integers(0, 256, 2500 * 2000 * 3, dtype=np.uint8)
    request.inputs.add(
        name="IMAGE", datatype="UINT8", shape=[1, 2500, 2000, 3]
    ).contents.uint_contents.extend(values.tolist())
    message = request.SerializeToString()
    with ThreadPoolExecutor(8) as pool, _Healthz(server.url) as health:
        results = list(pool.map(lambda _: _call(server.grpc_url, message, tuple(AUTH.items())), range(8)))
    print(f"8 calls of 15 M typed values: /healthz worst {health.worst * 1000:.0f} ms")
    assert [r[0] for r in results] == ["OK"] * 8, [r[:2] for r in results]
    assert health.worst < 1.0, f"/healthz took {health.worst:.2f} s"
    response = service_pb2.ModelInferResponse.FromString(results[0][2])
    assert list(response.outputs[0].shape) == [1, 2500, 2000]


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_the_request_id_is_checked_as_http_checks_it(server):
    from tritonclient.grpc import service_pb2

    forged = "x" * 4096 + "\nERROR forged log line"
    request = service_pb2.ModelInferRequest(model_name="tiny", id=forged)
    request.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 16, 16, 3])
    request.raw_input_contents.append(bytes(16 * 16 * 3))
    code, _, raw, trailing = _call(server.grpc_url, request.SerializeToString(), tuple(AUTH.items()))
    assert code == "OK"
    assert service_pb2.ModelInferResponse.FromString(raw).id == forged  # the protocol echoes it
    assert len(trailing["x-request-id"]) == 32 and trailing["x-request-id"] != forged  # ours: a fresh one
    request.id = "client-7"
    assert (
        _call(server.grpc_url, request.SerializeToString(), tuple(AUTH.items()))[3]["x-request-id"]
        == "client-7"
    )
    metadata = (*AUTH.items(), ("x-request-id", "trace-42"))
    assert _call(server.grpc_url, request.SerializeToString(), metadata)[3]["x-request-id"] == "trace-42"
    assert "forged log line" not in server.output()


@pytest.mark.anyio
async def test_a_message_is_held_in_the_body_budget_until_its_call_ends(
    tiny_artifact, tiny_segmenter, chanseg_logs
):
    """gRPC messages count in MEMORY_BUDGET_MB like HTTP bodies: reserved before they
    are read, held until the call ends; grpc refuses one over MAX_UPLOAD_BYTES."""
    import asyncio

    import grpc
    from tritonclient.grpc import service_pb2

    slow = SlowSegmenter(tiny_segmenter, delay=0)
    port = free_port()
    settings = make_settings(tiny_artifact, grpc_port=port, max_upload_bytes=4 << 20)
    async with serve(settings, segmenter=slow) as client:
        state = client.app.state.chanseg
        request = service_pb2.ModelInferRequest(model_name="tiny")
        request.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 512, 512, 3])
        request.raw_input_contents.append(bytes(512 * 512 * 3))
        message = request.SerializeToString()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            slow.gate.clear()  # the call waits in its batch, its message read
            call = asyncio.ensure_future(infer(message, timeout=60))
            while not slow.batches:
                await asyncio.sleep(0.01)
            assert state.body_budget.in_use == 2 * len(message)
            slow.gate.set()
            await call
            await asyncio.sleep(0.1)  # the call's end reaches the server
            assert state.body_budget.in_use == 0
            too_large = service_pb2.ModelInferRequest(model_name="tiny", raw_input_contents=[bytes(5 << 20)])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await infer(too_large.SerializeToString(), timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.1)
            assert state.body_budget.in_use == 0 and "unhandled" not in chanseg_logs.text
