"""Triton's and KServe's tools against a real chanseg, unchanged: the model configuration and
statistics extensions (tritonclient over HTTP and gRPC) and Triton's own load tester,
perf_analyzer (the real binary, testbed/perf_analyzer.py), over HTTP and gRPC."""

from __future__ import annotations

import gzip
import zlib

import httpx
import numpy as np
import pytest

from testbed import perf_analyzer
from tests.real_parts import missing
from tests.service.conftest import SHARED_AUTH
from tests.service.test_grpc import grpcclient
from tests.service.test_v2 import _infer_pixels, triton


@pytest.fixture
def server(shared_server):
    return shared_server


def _success(stats: dict) -> int:
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_model_configuration_over_http_and_grpc(server):
    http = triton().InferenceServerClient(server.url.removeprefix("http://"))
    config = http.get_model_config("tiny", headers=dict(SHARED_AUTH))
    assert config["name"] == "tiny" and config["max_batch_size"] == 16
    assert [(i["name"], i["data_type"], i["dims"], i["optional"]) for i in config["input"]] == [
        ("IMAGE", "TYPE_UINT8", [-1, -1, 3], True),
        ("IMAGE_BYTES", "TYPE_STRING", [1], True),
    ]
    assert [(o["name"], o["dims"]) for o in config["output"]][:2] == [
        ("MASK", [-1, -1]),
        ("PROBABILITIES", [4, -1, -1]),
    ]
    assert config["dynamic_batching"]["preferred_batch_size"] == [4]  # the server's MAX_BATCH_SIZE
    assert http.get_model_config("tiny", "7", headers=dict(SHARED_AUTH))["name"] == "tiny"
    meta = http.get_server_metadata()
    assert {"model_configuration", "statistics"} <= set(meta["extensions"])  # version "7" is a number

    g = grpcclient()
    grpc = g.InferenceServerClient(server.grpc_url)
    proto = grpc.get_model_config("tiny", headers=dict(SHARED_AUTH), as_json=True)["config"]
    assert proto["name"] == "tiny" and proto["max_batch_size"] == 16
    assert [i["name"] for i in proto["input"]] == ["IMAGE", "IMAGE_BYTES"]
    assert proto["dynamic_batching"]["preferred_batch_size"] == [4]
    with pytest.raises(g.InferenceServerException) as err:
        grpc.get_model_config("other", headers=dict(SHARED_AUTH))
    assert str(err.value.status()) == "StatusCode.NOT_FOUND"
    with pytest.raises(g.InferenceServerException) as err:
        grpc.get_model_config("tiny")  # behind the key
    assert str(err.value.status()) == "StatusCode.UNAUTHENTICATED"


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_statistics_count_what_the_batcher_did(server):
    http = triton().InferenceServerClient(server.url.removeprefix("http://"))
    g = grpcclient()
    grpc = g.InferenceServerClient(server.grpc_url)
    before = http.get_inference_statistics("tiny", headers=dict(SHARED_AUTH))
    images = np.random.default_rng(3).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    _infer_pixels(server, images, ["MASK"], binary=True)
    after = http.get_inference_statistics("tiny", headers=dict(SHARED_AUTH))
    assert _success(after) == _success(before) + 1
    stats, old = after["model_stats"][0], before["model_stats"][0]
    assert stats["version"] == "7" and stats["inference_count"] == old["inference_count"] + 2
    assert stats["execution_count"] > old["execution_count"]
    spent = {
        k: stats["inference_stats"][k]["ns"] - old["inference_stats"][k]["ns"]
        for k in ("success", "queue", "compute_infer")
    }
    assert spent["compute_infer"] > 0 and spent["success"] >= spent["queue"] + spent["compute_infer"]
    assert sum(b["compute_infer"]["count"] for b in stats["batch_stats"]) == stats["execution_count"]
    # Every model, and over gRPC the same figures.
    assert [m["name"] for m in http.get_inference_statistics(headers=dict(SHARED_AUTH))["model_stats"]] == [
        "tiny"
    ]
    proto = grpc.get_inference_statistics("tiny", headers=dict(SHARED_AUTH), as_json=True)
    assert int(proto["model_stats"][0]["inference_stats"]["success"]["count"]) >= _success(after)
    with pytest.raises(triton().InferenceServerException):
        http.get_inference_statistics("tiny", "8", headers=dict(SHARED_AUTH))  # no such version


def _perf_analyzer():
    if perf_analyzer.binary() is None:
        missing(
            "perf_analyzer",
            "python -m testbed.perf_analyzer install (make install runs it) and apt-get install libb64-0d",
        )
    return perf_analyzer


@pytest.mark.slow
@pytest.mark.real_part("perf_analyzer")
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_at_concurrency_1_and_4(server, protocol, tmp_path):
    pa = _perf_analyzer()
    data = pa.input_data(
        tmp_path / "input.json", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    )
    url = server.grpc_url if protocol == "grpc" else server.url.removeprefix("http://")
    http = triton().InferenceServerClient(server.url.removeprefix("http://"))
    for concurrency in (1, 4):
        before = _success(http.get_inference_statistics("tiny", headers=dict(SHARED_AUTH)))
        figures = pa.run(
            url,
            "tiny",
            data,
            concurrency,
            protocol,
            headers=dict(SHARED_AUTH),
            window_ms=1500,
            stability_percent=100,
        )
        after = _success(http.get_inference_statistics("tiny", headers=dict(SHARED_AUTH)))
        assert figures["Inferences/Second"] > 0, figures["stdout"]
        assert figures["Concurrency"] == concurrency
        # perf_analyzer read the statistics extension: the server-side split is in its report.
        assert figures["Server Compute Infer"] > 0 and "Server:" in figures["stdout"], figures["stdout"]
        assert after - before >= 10  # its requests were served, and counted


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_read(server, algorithm):
    images = np.random.default_rng(7).integers(0, 256, (1, 40, 48, 3), dtype=np.uint8)
    plain = _infer_pixels(server, images, ["MASK"], binary=True).as_numpy("MASK")
    for binary in (True, False):
        squeezed = _infer_pixels(
            server, images, ["MASK"], binary=binary, request_compression_algorithm=algorithm
        )
        assert np.array_equal(squeezed.as_numpy("MASK"), plain)


def _post(server, path: str, body: bytes, **headers) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers={**SHARED_AUTH, **headers}, timeout=60)


@pytest.mark.slow
def test_bad_or_oversized_compressed_bodies_are_4xx(server):
    bomb = zlib.compress(b"{" + b" " * (40 << 20) + b"}", 9)  # 40 KB that inflate to 40 MiB
    assert len(bomb) < 100_000
    r = _post(server, "/v2/models/tiny/infer", bomb, **{"content-encoding": "deflate"})
    assert r.status_code == 413 and "inflates to over" in r.json()["error"]
    gz = gzip.compress(b'{"inputs": []}')
    r = _post(server, "/v2/models/tiny/infer", gz[:-6], **{"content-encoding": "gzip"})
    assert r.status_code == 400 and "cut short" in r.json()["error"], r.text
    r = _post(server, "/v2/models/tiny/infer", b"not gzip at all", **{"content-encoding": "gzip"})
    assert r.status_code == 400 and "not valid gzip" in r.json()["error"]
    r = _post(server, "/v2/models/tiny/infer", b"x", **{"content-encoding": "br"})
    assert r.status_code == 415 and "gzip, deflate or identity" in r.json()["error"]
    assert httpx.get(server.url + "/healthz").status_code == 200


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_shared_memory_is_refused_by_name_never_ignored(server):
    http = triton()
    client = http.InferenceServerClient(server.url.removeprefix("http://"))
    with pytest.raises(http.InferenceServerException) as err:
        client.register_system_shared_memory("region", "/chanseg_test", 1 << 20, headers=dict(SHARED_AUTH))
    assert "shared-memory extension" in str(err.value)
    with pytest.raises(http.InferenceServerException) as err:
        client.get_system_shared_memory_status(headers=dict(SHARED_AUTH))
    assert "shared-memory extension" in str(err.value)
    # An output asked into a region: refused, not answered inline with the region left as it was.
    image = np.zeros((1, 40, 48, 3), np.uint8)
    inp = http.InferInput("IMAGE", list(image.shape), "UINT8")
    inp.set_data_from_numpy(image, binary_data=True)
    out = http.InferRequestedOutput("MASK", binary_data=True)
    out.set_shared_memory("region", 40 * 48)
    with pytest.raises(http.InferenceServerException) as err:
        client.infer("tiny", [inp], outputs=[out], headers=dict(SHARED_AUTH))
    assert "output 'MASK' names a shared-memory region" in str(err.value)
    assert "400" in str(err.value.status())

    g = grpcclient()
    grpc = g.InferenceServerClient(server.grpc_url)
    with pytest.raises(g.InferenceServerException) as err:
        grpc.register_system_shared_memory("region", "/chanseg_test", 1 << 20, headers=dict(SHARED_AUTH))
    assert str(err.value.status()) == "StatusCode.INVALID_ARGUMENT" and "shared-memory extension" in str(
        err.value
    )
    ginp = g.InferInput("IMAGE", list(image.shape), "UINT8")
    ginp.set_data_from_numpy(image)
    gout = g.InferRequestedOutput("MASK")
    gout.set_shared_memory("region", 40 * 48)
    with pytest.raises(g.InferenceServerException) as err:
        grpc.infer("tiny", [ginp], outputs=[gout], headers=dict(SHARED_AUTH))
    assert str(err.value.status()) == "StatusCode.INVALID_ARGUMENT" and "shared-memory region" in str(
        err.value
    )


@pytest.mark.slow
def test_v2_with_a_slash_answers_instead_of_redirecting(server):
    r = httpx.get(server.url + "/v2/", follow_redirects=False)
    assert r.status_code == 200 and r.json()["name"] == "chanseg"
