"""A model repository in Triton's layout (service/triton_layout.py, service/repository.py):
in-process through HTTP here; a real process with tritonclient over HTTP and gRPC at the end."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import model
from tests.conftest import TINY, make_net
from tests.real_parts import missing
from tests.service.conftest import (
    SHARED_AUTH,
    ServerProcess,
    decode_mask,
    make_settings,
    png_bytes,
    random_image,
    serve,
)

pytest.importorskip("tritonclient.grpc.model_config_pb2")

IMAGE = random_image(21, 64, 64)
CONFIG = """
name: "tiny"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3, 64, 64 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4, 64, 64 ] label_filename: "labels.txt" } ]
parameters { key: "mean" value { string_value: "0.5,0.5,0.5" } }
parameters { key: "std" value { string_value: "0.25,0.25,0.25" } }
instance_group [ { kind: KIND_CPU count: 1 } ]
"""


def triton_repository(root: Path) -> Path:
    """Model "tiny": version 1 a plain TorchScript file (Triton's PyTorch backend's), version 2
    a chanseg artifact (other weights), config.pbtxt and a label file; beside it a flat artifact."""
    folder = root / "tiny"
    (folder / "1").mkdir(parents=True)
    (folder / "2").mkdir()
    torch.jit.save(torch.jit.script(make_net(seed=0)), str(folder / "1" / "model.pt"))
    model.export_torchscript(make_net(seed=1), folder / "2" / "model.pt", version="8")
    (folder / "config.pbtxt").write_text(CONFIG)
    (folder / "labels.txt").write_text("background\ncircle\nrectangle\ntriangle\n")
    model.export_torchscript(
        make_net(dataclasses.replace(TINY, name="flat"), seed=2), root / "flat.pt", version="9"
    )
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return triton_repository(tmp_path_factory.mktemp("triton"))


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    where = tmp_path_factory.mktemp("reference")
    return {
        version: model.load(
            model.export_torchscript(make_net(seed=seed), where / f"{seed}.pt"), "cpu"
        ).predict(IMAGE)
        for version, seed in (("1", 0), ("2", 1))
    }


def _settings(repo: Path, tmp_path: Path, **overrides):
    values = dict(model_repository=repo, cache_dir=tmp_path / "cache")
    values.update(overrides)
    return make_settings(values.pop("model_path", None), **values)


async def _mask(client, version=None):
    path = "/v2/models/tiny" + (f"/versions/{version}" if version else "") + "/infer"
    body = {
        "inputs": [
            {"name": "IMAGE", "datatype": "UINT8", "shape": [1, 64, 64, 3], "data": IMAGE.ravel().tolist()}
        ]
    }
    r = await client.post(path, json=body)
    return r, (
        np.array(r.json()["outputs"][0]["data"], dtype=np.uint8).reshape(64, 64)
        if r.status_code == 200
        else None
    )


@pytest.mark.anyio
async def test_the_only_triton_model_serves_from_start_up_and_versions_are_its_folders(repo, masks, tmp_path):
    async with serve(_settings(repo, tmp_path)) as client:
        meta = (await client.get("/v2/models/tiny")).json()
        assert meta["versions"] == ["2"]  # latest: the highest version
        assert meta["parameters"]["classes"] == ["background", "circle", "rectangle", "triangle"]
        assert (await client.get("/v2/models/tiny/versions/2")).status_code == 200
        assert (await client.get("/v2/models/tiny/versions/2/ready")).json()["ready"] is True
        r, mask = await _mask(client, "2")
        assert r.status_code == 200 and r.headers["x-model-version"] == "2"
        np.testing.assert_array_equal(mask, masks["2"])

        for path in ("/v2/models/tiny/versions/1", "/v2/models/tiny/versions/1/ready"):
            r = await client.get(path)
            assert r.status_code == 404
            assert (
                "version '1' of model 'tiny' is in the model repository but not loaded: version '2' serves"
                in (r.json()["error"])
            )
        r, _ = await _mask(client, "1")
        assert r.status_code == 404 and "version '2' serves" in r.json()["error"]
        r = await client.get("/v2/models/tiny/versions/3/ready")
        assert r.status_code == 404 and "unknown version '3'" in r.json()["error"]

        index = (await client.post("/v2/repository/index")).json()
        assert [(row["name"], row["version"], row["path"], row["state"]) for row in index] == [
            ("tiny", "1", "tiny/1/model.pt", "UNAVAILABLE"),
            ("tiny", "2", "tiny/2/model.pt", "READY"),
            ("flat", "9", "flat.pt", "UNAVAILABLE"),  # the flat layout beside it, as before
        ]

        r = await client.post(
            "/v2/repository/models/tiny/load", json={"parameters": {"path": "tiny/1/model.pt"}}
        )
        assert r.status_code == 200 and r.json()["version"] == "1", r.text
        r, mask = await _mask(client, "1")
        assert r.status_code == 200
        np.testing.assert_array_equal(mask, masks["1"])
        assert [row["state"] for row in (await client.post("/v2/repository/index")).json()] == [
            "READY", "UNAVAILABLE", "UNAVAILABLE",
        ]  # fmt: skip
        assert (await client.get("/v2/models/tiny/versions/2/ready")).status_code == 404
        wrapped = list((tmp_path / "cache" / "triton").iterdir())
        assert len(wrapped) == 1 and wrapped[0].name.startswith("tiny-1-")  # the plain file, wrapped once

        r = await client.post("/v2/repository/models/tiny/load")  # no path: the policy's version
        assert r.status_code == 200 and r.json()["version"] == "2"
        r = await client.post(
            "/v2/repository/models/flat/load", json={"parameters": {"path": "tiny/1/model.pt"}}
        )
        assert r.status_code == 400 and "is a version of model 'tiny', not 'flat'" in r.json()["error"]
        r = await client.post("/v2/repository/models/tiny/unload")
        assert r.status_code == 200
        assert (await client.get("/v2/models/tiny/versions/2/ready")).status_code == 404


@pytest.mark.anyio
@pytest.mark.parametrize(
    "parameters",
    [{"config": '{"max_batch_size": 1}'}, {"file:1/model.pt": "AAAA", "config": "{}"}],
    ids=["config", "files"],
)
async def test_triton_load_overrides_are_refused(repo, tmp_path, parameters):
    async with serve(_settings(repo, tmp_path)) as client:
        r = await client.post("/v2/repository/models/tiny/load", json={"parameters": parameters})
        assert r.status_code == 400 and "chanseg does not load a config or files sent with the call" in r.text
        assert ("file:1/model.pt" in r.text) == ("file:1/model.pt" in parameters)


@pytest.mark.anyio
async def test_model_path_may_name_a_triton_model_folder_or_version(repo, tmp_path):
    async with serve(_settings(repo, tmp_path, model_path=repo / "tiny" / "1")) as client:
        assert (await client.get("/v2/models/tiny")).json()["versions"] == ["1"]
    async with serve(_settings(None, tmp_path, model_path=repo / "tiny", model_repository=None)) as client:
        assert (await client.get("/v2/models/tiny")).json()["versions"] == ["2"]  # its own repository


@pytest.mark.anyio
async def test_a_config_chanseg_cannot_serve_is_listed_with_why_and_refused(repo, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(repo, root)
    (root / "tiny" / "config.pbtxt").write_text('name: "tiny"\nversion_policy: { all: {} }\n')
    (root / "other" / "1").mkdir(parents=True)
    os.link(repo / "tiny" / "1" / "model.pt", root / "other" / "1" / "model.pt")  # plain, no config
    async with serve(_settings(root, tmp_path, model_path=root / "flat.pt")) as client:
        index = (await client.post("/v2/repository/index")).json()
        assert index[0] == {"name": "other", "version": "1", "path": "other/1/model.pt", "state": "UNAVAILABLE",
                            "reason": "not loaded"}  # fmt: skip
        assert index[1]["name"] == "tiny" and index[1]["version"] == ""
        assert "version_policy all is not supported: chanseg serves one version" in index[1]["reason"]
        r = await client.post("/v2/repository/models/tiny/load")
        assert r.status_code == 400 and "version_policy all is not supported" in r.json()["error"]
        r = await client.post("/v2/repository/models/other/load")
        assert r.status_code == 400 and "a plain TorchScript model needs config.pbtxt" in r.json()["error"]
        assert "flat 9 keeps serving" in r.json()["error"]
        assert (await client.get("/v1/model")).json()["version"] == "9"


@pytest.mark.anyio
async def test_max_batch_size_caps_the_servers_batches(repo, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(repo, root)
    (root / "tiny" / "config.pbtxt").write_text(CONFIG.replace("max_batch_size: 8", "max_batch_size: 2"))
    async with serve(_settings(root, tmp_path, max_batch_size="auto", auto_batch_limit=4)) as client:
        assert (await client.get("/v1/model")).json()["batching"]["max_batch_size"] <= 2
    settings = _settings(root, tmp_path, model_path=root / "flat.pt", max_batch_size=4)
    async with serve(settings) as client:
        r = await client.post("/v2/repository/models/tiny/load")
        assert (
            r.status_code == 400 and "it runs batches of at most 2, this server forms 4" in r.json()["error"]
        )


# -- a real process, tritonclient over HTTP and gRPC -----------------------------------------------


def _clients():
    try:
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient
    except ImportError:
        missing("tritonclient[http,grpc]", "pip install 'tritonclient[http,grpc]' (a dev dependency)")
    return httpclient, grpcclient


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory):
    """``python -m service`` on a Triton-layout repository (MODEL_PATH unset), gRPC on, an
    API key and an admin key of its own."""
    tmp = tmp_path_factory.mktemp("triton-server")
    root = triton_repository(tmp / "repo")
    proc = ServerProcess(
        None, tmp, grpc=True, CHANSEG_MODEL_REPOSITORY=str(root),
        CHANSEG_API_KEY="user-key", CHANSEG_ADMIN_API_KEY="admin-key", CHANSEG_CACHE_DIR=str(tmp / "cache"),
    )  # fmt: skip
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


USER, ADMIN = {"x-api-key": "user-key"}, {"x-api-key": "admin-key"}


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_tritonclient_asks_for_numeric_versions_over_http_and_grpc(triton_server, masks):
    http, grpc = _clients()
    h = http.InferenceServerClient(triton_server.url.removeprefix("http://"))
    g = grpc.InferenceServerClient(triton_server.grpc_url)

    def infer(client, module, version):
        inp = module.InferInput("IMAGE", [1, 64, 64, 3], "UINT8")
        inp.set_data_from_numpy(IMAGE[None])
        return client.infer("tiny", [inp], model_version=version, headers=dict(USER)).as_numpy("MASK")[0]

    for client, module in ((h, http), (g, grpc)):
        assert client.is_model_ready("tiny", "2", headers=dict(USER))
        assert not client.is_model_ready("tiny", "1", headers=dict(USER))  # in the repository, not serving
        meta = client.get_model_metadata("tiny", "2", headers=dict(USER))
        assert (meta["versions"] if isinstance(meta, dict) else list(meta.versions)) == ["2"]
        np.testing.assert_array_equal(infer(client, module, "2"), masks["2"])
        with pytest.raises(module.InferenceServerException) as err:
            infer(client, module, "1")
        assert "version '2' serves" in str(err.value)
    with pytest.raises(grpc.InferenceServerException) as err:
        g.get_model_metadata("tiny", "1", headers=dict(USER))
    assert str(err.value.status()) == "StatusCode.NOT_FOUND"

    # The repository over gRPC: the admin key only.
    with pytest.raises(grpc.InferenceServerException) as err:
        g.get_model_repository_index(headers=dict(USER))
    assert str(err.value.status()) == "StatusCode.UNAUTHENTICATED"
    index = g.get_model_repository_index(headers=dict(ADMIN), as_json=True)["models"]
    assert [(m["name"], m["version"], m.get("state")) for m in index] == [
        ("tiny", "1", "UNAVAILABLE"), ("tiny", "2", "READY"), ("flat", "9", "UNAVAILABLE"),
    ]  # fmt: skip
    assert [
        (m["name"], m["version"], m["state"]) for m in h.get_model_repository_index(headers=dict(ADMIN))
    ] == [(m["name"], m["version"], m["state"]) for m in index]

    with pytest.raises(grpc.InferenceServerException) as err:
        g.load_model(
            "tiny", headers=dict(ADMIN), config='{"version_policy": {"specific": {"versions": [1]}}}'
        )
    assert str(err.value.status()) == "StatusCode.INVALID_ARGUMENT" and "parameters config" in str(err.value)
    with pytest.raises(grpc.InferenceServerException) as err:
        g.load_model("tiny", headers=dict(ADMIN), config="{}", files={"file:1/model.pt": b"\0" * 16})
    assert "file:1/model.pt" in str(err.value)

    # Version 1 by its path (a raw call: tritonclient's load_model sends no path), then back by the policy.
    from tritonclient.grpc import service_pb2

    request = service_pb2.RepositoryModelLoadRequest(model_name="tiny")
    request.parameters["path"].string_param = "tiny/1/model.pt"
    g._client_stub.RepositoryModelLoad(request=request, metadata=tuple(ADMIN.items()))
    assert g.is_model_ready("tiny", "1", headers=dict(USER)) and not g.is_model_ready(
        "tiny", "2", headers=dict(USER)
    )
    np.testing.assert_array_equal(infer(h, http, "1"), masks["1"])

    with pytest.raises(grpc.InferenceServerException) as err:
        g.unload_model("tiny", headers=dict(USER))
    assert str(err.value.status()) == "StatusCode.UNAUTHENTICATED"
    g.unload_model("tiny", headers=dict(ADMIN))
    assert not g.is_server_ready() and not h.is_model_ready("tiny", headers=dict(USER))
    with pytest.raises(grpc.InferenceServerException) as err:
        g.unload_model("tiny", headers=dict(ADMIN))
    assert str(err.value.status()) == "StatusCode.INVALID_ARGUMENT" and "is not loaded" in str(err.value)
    g.load_model("tiny", headers=dict(ADMIN))  # the policy: the latest
    assert g.is_model_ready("tiny", "2", headers=dict(USER))
    h.unload_model("tiny", headers=dict(ADMIN))
    h.load_model("tiny", headers=dict(ADMIN))
    assert h.is_model_ready("tiny", "2", headers=dict(USER))
    np.testing.assert_array_equal(decode_mask(httpx.post(
        triton_server.url + "/predict?format=png", files={"file": ("a.png", png_bytes(IMAGE))}, headers=dict(USER)
    ).content), masks["2"])  # fmt: skip


@pytest.mark.slow
@pytest.mark.real_part("tritonclient")
def test_repository_calls_without_a_repository_are_permission_denied(shared_server):
    _, grpc = _clients()
    client = grpc.InferenceServerClient(shared_server.grpc_url)
    for call in (client.get_model_repository_index, lambda **kw: client.load_model("tiny", **kw)):
        with pytest.raises(grpc.InferenceServerException) as err:
            call(headers=dict(SHARED_AUTH))
        assert str(err.value.status()) == "StatusCode.PERMISSION_DENIED" and "MODEL_REPOSITORY" in str(
            err.value
        )


@pytest.mark.anyio
async def test_a_config_chanseg_cannot_read_stops_start_up_saying_why(repo, tmp_path):
    from service.triton_config import TritonLayoutError

    root = tmp_path / "repo"
    shutil.copytree(repo, root)
    (root / "tiny" / "config.pbtxt").write_text('name: "tiny" input [ { dims: [3, 64, 64')
    with pytest.raises(TritonLayoutError, match="tiny/config.pbtxt: not a Triton model config"):
        async with serve(_settings(root, tmp_path)):
            pass
