"""Model versions at run time: the v2 model-repository extension and the swap
(service/repository.py), in-process; under load in a real process with SIGHUP in
tests/service/test_swap.py."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import time
import weakref
import zipfile
from pathlib import Path

import numpy as np
import pytest

import model
from model.loading import read_metadata
from service.pipeline import InferItem
from service.repository import COLLECT_EVERY_S
from service.runner import BatchRunner
from testbed.metrics import metric_samples
from tests.conftest import make_net
from tests.service.conftest import decode_mask, make_settings, png_bytes, random_image, serve, tracked_by_gc

pytestmark = pytest.mark.anyio

IMAGE = random_image(21, 64, 64)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A repository: versions 7 and 8 of "tiny" (other weights), a corrupt file, a README, one elsewhere."""
    root = tmp_path_factory.mktemp("repository")
    model.export_torchscript(make_net(seed=0), root / "a.pt", version="7")
    (root / "b").mkdir()
    model.export_torchscript(make_net(seed=1), root / "b" / "model.pt", version="8")
    data = (root / "a.pt").read_bytes()
    (root / "corrupt.pt").write_bytes(data[: len(data) // 2])
    (root / "README.txt").write_text("versions of tiny\n")
    with zipfile.ZipFile(root / "a.pt") as src, zipfile.ZipFile(root / "broken.pt", "w") as dst:
        for item in src.infolist():  # its metadata intact, its code not
            dst.writestr(item, b"garbage" if item.filename.endswith("data.pkl") else src.read(item))
    model.export_torchscript(make_net(seed=2), root.parent / "outside.pt", version="9")
    return root


@pytest.fixture(scope="module")
def masks(repo):
    found = {
        v: model.load(p, device="cpu").predict(IMAGE)
        for v, p in (("7", repo / "a.pt"), ("8", repo / "b" / "model.pt"))
    }
    assert (found["7"] != found["8"]).any(), "the two versions must answer differently"
    return found


async def _predict(client, **headers):
    r = await client.post(
        "/predict?format=png", files={"file": ("x.png", png_bytes(IMAGE), "image/png")}, headers=headers
    )
    return r


async def test_off_unless_a_repository_is_set(tiny_artifact):
    async with serve(make_settings(tiny_artifact)) as client:
        r = await client.post("/v2/repository/index")
        assert r.status_code == 403 and "MODEL_REPOSITORY" in r.json()["error"]
        assert (await client.post("/v2/repository/models/tiny/load")).status_code == 403
        assert "model_repository" not in (await client.get("/v2")).json()["extensions"]


async def test_load_swaps_versions_and_everything_follows(repo, masks):
    async with serve(make_settings(str(repo / "a.pt"), model_repository=repo)) as client:
        assert "model_repository" in (await client.get("/v2")).json()["extensions"]
        index = (await client.post("/v2/repository/index")).json()
        assert [(row["path"], row["version"], row["state"]) for row in index] == [
            ("a.pt", "7", "READY"),
            ("b/model.pt", "8", "UNAVAILABLE"),
            ("broken.pt", "7", "UNAVAILABLE"),
        ]  # the corrupt file and the README are not models
        r = await _predict(client)
        assert r.headers["x-model-version"] == "7"
        np.testing.assert_array_equal(decode_mask(r.content), masks["7"])

        r = await client.post("/v2/repository/models/tiny/load", json={"parameters": {"path": "b/model.pt"}})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == "8" and r.json()["warm_up_s"] >= 0
        r = await _predict(client)
        assert r.headers["x-model-version"] == "8"
        np.testing.assert_array_equal(decode_mask(r.content), masks["8"])
        assert (await client.get("/v1/model")).json()["version"] == "8"
        info = metric_samples((await client.get("/metrics")).text)
        assert any(
            name == "chanseg_model_info" and dict(labels).get("version") == "8" for name, labels in info
        )
        assert (await client.get("/v2/models/tiny/versions/8/ready")).status_code == 200
        assert (await client.get("/v2/models/tiny/versions/7/ready")).status_code == 404
        assert [row["state"] for row in (await client.post("/v2/repository/index")).json()] == [
            "UNAVAILABLE",
            "READY",
            "UNAVAILABLE",
        ]
        ready = (await client.post("/v2/repository/index", json={"ready": True})).json()
        assert [row["version"] for row in ready] == ["8"]

        # Back to 7: the only artifact of that name is not enough (there are two), the path is.
        r = await client.post("/v2/repository/models/tiny/load")
        assert r.status_code == 400 and "3 artifacts" in r.json()["error"]
        r = await client.post("/v2/repository/models/tiny/load", json={"parameters": {"path": "a.pt"}})
        assert r.status_code == 200 and (await _predict(client)).headers["x-model-version"] == "7"


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"parameters": {"path": "corrupt.pt"}}, 400, "failed to load corrupt.pt: not a chanseg artifact"),
        ({"parameters": {"path": "broken.pt"}}, 400, "failed to load broken.pt: not a loadable TorchScript"),
        ({"parameters": {"path": "../outside.pt"}}, 400, "outside the model repository"),
        ({"parameters": {"path": "/etc/passwd"}}, 400, "outside the model repository"),
        ({"parameters": {"path": "missing.pt"}}, 400, "no such file"),
        ({"parameters": {"path": "README.txt"}}, 400, "not a chanseg artifact"),
        ({"parameters": {"path": 7}}, 400, "must be a string"),
        ({"parameters": []}, 400, "must be an object"),
        ("[1, 2]", 400, "JSON object"),
        ("{nope", 400, "not JSON"),
    ],
    ids=[
        "corrupt",
        "broken",
        "dotdot",
        "absolute",
        "missing",
        "not-a-model",
        "path-type",
        "parameters-type",
        "array",
        "not-json",
    ],
)
async def test_a_bad_load_is_refused_and_the_old_version_keeps_serving(repo, masks, body, status, words):
    async with serve(make_settings(str(repo / "a.pt"), model_repository=repo)) as client:
        kwargs = {"content": body} if isinstance(body, str) else {"json": body}
        r = await client.post("/v2/repository/models/tiny/load", **kwargs)
        assert r.status_code == status and words in r.json()["error"], r.text
        r = await _predict(client)
        assert r.status_code == 200 and r.headers["x-model-version"] == "7"
        np.testing.assert_array_equal(decode_mask(r.content), masks["7"])
        assert (await client.get("/readyz")).status_code == 200


async def test_wrong_name_and_api_key(repo):
    settings = make_settings(str(repo / "a.pt"), model_repository=repo, api_key="k")
    async with serve(settings) as client:
        assert (await client.post("/v2/repository/index")).status_code == 401
        r = await client.post(
            "/v2/repository/models/other/load",
            json={"parameters": {"path": "a.pt"}},
            headers={"X-API-Key": "k"},
        )
        assert r.status_code == 400 and "holds model 'tiny'" in r.json()["error"]


async def test_unload_then_load(repo, masks):
    async with serve(make_settings(str(repo / "a.pt"), model_repository=repo)) as client:
        assert (await client.post("/v2/repository/models/other/unload")).status_code == 400
        assert (await client.post("/v2/repository/models/tiny/unload")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        r = await _predict(client)
        assert r.status_code == 503 and "unloaded" in r.json()["detail"]
        assert (await client.get("/healthz")).status_code == 200  # alive: nothing to restart
        r = await client.post("/v2/repository/models/tiny/load", json={"parameters": {"path": "b/model.pt"}})
        assert r.status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        np.testing.assert_array_equal(decode_mask((await _predict(client)).content), masks["8"])


async def test_unload_right_after_traffic_then_load(repo, masks):
    """The batcher kept its last batch, and with it the version, until another batch came:
    with nothing loaded none came, and every load waited REQUEST_TIMEOUT_S for a 409."""
    async with serve(make_settings(str(repo / "a.pt"), model_repository=repo, request_timeout_s=5)) as client:
        assert (await _predict(client)).status_code == 200
        assert (await client.post("/v2/repository/models/tiny/unload")).status_code == 200
        started = time.monotonic()
        r = await client.post("/v2/repository/models/tiny/load", json={"parameters": {"path": "b/model.pt"}})
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 4  # not the wait for REQUEST_TIMEOUT_S
        assert (await client.get("/readyz")).status_code == 200
        np.testing.assert_array_equal(decode_mask((await _predict(client)).content), masks["8"])


async def test_a_quick_rollback_with_no_request_between(repo, masks):
    """A -> B -> A: the second load waits for A, which B retired, and nothing else holds."""
    async with serve(make_settings(str(repo / "a.pt"), model_repository=repo, request_timeout_s=5)) as client:
        assert (await _predict(client)).status_code == 200
        for path in ("b/model.pt", "a.pt"):
            r = await client.post("/v2/repository/models/tiny/load", json={"parameters": {"path": path}})
            assert r.status_code == 200, r.text
        np.testing.assert_array_equal(decode_mask((await _predict(client)).content), masks["7"])


async def test_a_retired_version_in_the_frozen_heap_is_freed_even_in_a_cycle(repo, masks):
    """Start-up froze the heap, the first version with it (service.resources.freeze_heap);
    a version kept alive only by a reference cycle must still be collected before the
    next load (else: 409 after REQUEST_TIMEOUT_S), and the heap is frozen again after."""
    async with serve(make_settings(str(repo / "a.pt"), model_repository=repo, request_timeout_s=3)) as client:
        first = weakref.ref(client.app.state.chanseg.segmenter)
        first().cycle = first()  # a cycle among frozen objects: reference counting alone never frees it
        assert not tracked_by_gc(first())  # frozen: a collection does not look at it
        assert (await client.post("/v2/repository/models/tiny/unload")).status_code == 200
        r = await client.post("/v2/repository/models/tiny/load", json={"parameters": {"path": "b/model.pt"}})
        assert r.status_code == 200, r.text
        assert first() is None
        assert gc.get_freeze_count() > 0 and not tracked_by_gc(client.app.state.chanseg.segmenter)
        np.testing.assert_array_equal(decode_mask((await _predict(client)).content), masks["8"])


async def test_waiting_for_a_busy_retired_version_does_not_stall_the_event_loop(repo, masks):
    """A load waits while the version the last swap retired still answers a request. In
    the thawed heap a full collection stops the event loop ~0.1 s: the wait runs one a
    second at most (it ran one every 50 ms, stalling the loop for most of the wait), and
    still frees the version, even one held by a cycle, once its request lets go."""
    async with serve(
        make_settings(str(repo / "a.pt"), model_repository=repo, request_timeout_s=10)
    ) as client:
        body = {"parameters": {"path": "b/model.pt"}}
        busy = [client.app.state.chanseg.segmenter]  # what a request in flight holds
        busy[0].cycle = busy[0]
        first = weakref.ref(busy[0])
        assert (await client.post("/v2/repository/models/tiny/load", json=body)).status_code == 200
        full = []

        def count(phase, info):
            if phase == "start" and info["generation"] == 2:
                full.append(time.monotonic())

        async def finish_the_request():
            await asyncio.sleep(2.5)
            busy.clear()

        gc.callbacks.append(count)
        try:
            started = time.monotonic()
            r, _ = await asyncio.gather(
                client.post("/v2/repository/models/tiny/load", json=body), finish_the_request()
            )
            waited = time.monotonic() - started
        finally:
            gc.callbacks.remove(count)
        assert r.status_code == 200, r.text
        assert first() is None and waited >= 2.5
        assert len(full) <= waited / COLLECT_EVERY_S + 2, (len(full), waited)  # was one every ~0.3 s
        np.testing.assert_array_equal(decode_mask((await _predict(client)).content), masks["8"])


async def test_a_version_given_to_create_app_is_freed_by_a_later_load(repo, masks):
    """``create_app(segmenter=...)`` hands the model to the server; once a load has
    replaced it nothing else keeps it (the lifespan kept it for the app's life, so the
    load after next waited REQUEST_TIMEOUT_S and answered 409)."""
    settings = make_settings(str(repo / "a.pt"), model_repository=repo, request_timeout_s=3)
    async with serve(settings, model.load(repo / "a.pt", device="cpu")) as client:
        first = weakref.ref(client.app.state.chanseg.segmenter)
        body = {"parameters": {"path": "b/model.pt"}}
        for _ in range(2):
            r = await client.post("/v2/repository/models/tiny/load", json=body)
            assert r.status_code == 200, r.text
        assert first() is None
        np.testing.assert_array_equal(decode_mask((await _predict(client)).content), masks["8"])


async def test_one_load_at_a_time(repo):
    async with serve(make_settings(str(repo / "a.pt"), model_repository=repo)) as client:
        body = {"parameters": {"path": "b/model.pt"}}
        first, second = await asyncio.gather(
            client.post("/v2/repository/models/tiny/load", json=body),
            client.post("/v2/repository/models/tiny/load", json=body),
        )
        assert sorted([first.status_code, second.status_code]) == [200, 409]


async def test_a_batch_straddling_the_swap_runs_each_request_on_its_own_version(repo, masks):
    async with serve(make_settings(str(repo / "a.pt"), model_repository=repo)) as client:
        state = client.app.state.chanseg
        old = state.segmenter
        new = model.load(repo / "b" / "model.pt", device="cpu")
        tensor = old.prepare(IMAGE)
        results = BatchRunner(state)(
            [InferItem(tensor, model=old), InferItem(tensor, model=new), InferItem(tensor, model=old)]
        )
        for result, version in zip(results, ["7", "8", "7"]):
            np.testing.assert_array_equal(old.restore(result.labels, IMAGE.shape[:2]), masks[version])


def test_repository_setting_must_be_a_folder(tmp_path):
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="not a folder"):
        Settings(model_repository=tmp_path / "nowhere")


def _repository_with(tmp_path, tiny_artifact, **planted) -> Path:
    """A repository holding the tiny model as a.pt, and per ``name=meta`` a copy of it whose
    meta.json is ``meta`` (bytes as they are, or a dict merged into the real one)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(tiny_artifact, root / "a.pt")
    for name, meta in planted.items():
        with zipfile.ZipFile(tiny_artifact) as z, zipfile.ZipFile(root / f"{name}.pt", "w") as out:
            for item in z.infolist():
                data = z.read(item)
                if item.filename.endswith("/extra/meta.json"):
                    data = (
                        meta if isinstance(meta, bytes) else json.dumps({**json.loads(data), **meta}).encode()
                    )
                out.writestr(item, data)
    return root


async def test_a_version_that_cannot_go_into_a_header_is_refused_at_load(tmp_path, tiny_artifact):
    """It loaded and reported ready, then every inference was a 500 (X-Model-Version)."""
    root = _repository_with(tmp_path, tiny_artifact, bad={"version": "1.0\u2013rc1"})
    async with serve(make_settings(str(root / "a.pt"), model_repository=root)) as client:
        r = await client.post("/v2/repository/models/tiny/load", json={"parameters": {"path": "bad.pt"}})
        assert r.status_code == 400 and "model version '1.0\u2013rc1': use letters" in r.json()["error"], (
            r.text
        )
        assert (await _predict(client)).status_code == 200  # the version serving keeps serving


# -- the admin API, as a web page and a careless client would drive it (issue 31) ------------


async def test_a_web_page_of_another_origin_cannot_drive_the_repository(repo, chanseg_logs):
    """With no key, any page could unload the model: a text/plain POST needs no preflight,
    and a page can rebind its own DNS name to the server's address."""
    async with serve(make_settings(str(repo / "a.pt"), model_repository=repo)) as client:
        unload = "/v2/repository/models/tiny/unload"
        r = await client.post(unload, content=b"{}", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.json()["error"]
        for origin, host in (
            ("http://evil.example", "127.0.0.1:8000"),  # another site
            ("http://rebound.example:8000", "rebound.example:8000"),  # its own name, rebound to this server
            ("null", "127.0.0.1:8000"),  # a sandboxed frame, a file
        ):
            r = await client.post(unload, json={}, headers={"origin": origin, "host": host})
            assert r.status_code == 403 and "ADMIN_ORIGINS" in r.json()["error"], (origin, r.text)
        assert (await client.get("/readyz")).status_code == 200  # nothing was unloaded
        # The server's own page reached by address, and tools (no Origin, no Content-Type: tritonclient).
        index = "/v2/repository/index"
        r = await client.post(
            index, json={}, headers={"origin": "http://127.0.0.1:8000", "host": "127.0.0.1:8000"}
        )
        assert r.status_code == 200
        assert (await client.post(index, content=b"{}")).status_code == 200
    assert (
        "MODEL_REPOSITORY is set without ADMIN_API_KEY: anyone who can reach this port" in chanseg_logs.text
    )


async def test_listed_origins_and_the_admin_key(repo):
    settings = make_settings(
        str(repo / "a.pt"), model_repository=repo, api_key="infer", admin_api_key="admin",
        admin_origins="https://console.example.com",
    )  # fmt: skip
    async with serve(settings) as client:
        index = "/v2/repository/index"
        assert (
            await client.post(index, headers={"x-api-key": "infer"})
        ).status_code == 401  # not the inference key
        assert (await client.post(index, headers={"authorization": "Bearer admin"})).status_code == 200
        console = {"origin": "https://console.example.com", "x-api-key": "admin"}
        assert (await client.post(index, headers=console)).status_code == 200
        assert (
            await client.post(index, headers={**console, "origin": "https://other.example.com"})
        ).status_code == 403
        assert (await _predict(client, **{"x-api-key": "infer"})).status_code == 200
        assert (
            await _predict(client, **{"x-api-key": "admin"})
        ).status_code == 401  # the admin key is for admin


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"[" * 60_000, 400, "nested too deeply"),
        (b"\xff\xfe{}", 400, "not JSON"),
        (b'{"parameters": {"path": "a\\u0000.pt"}}', 400, "NUL byte"),
        (b'{"parameters": {"path": "' + b"x" * 5000 + b'"}}', 400, "over 1024 characters"),
        (b'{"parameters": {"path": "' + b"d/" * 400 + b'a.pt"}}', 400, "no such file"),
        (b"[" + b"0," * 40_000 + b"0]", 413, "at most 65536"),
    ],
    ids=["deep nesting", "not utf-8", "NUL byte", "long path", "deep path", "large array"],
)
async def test_malformed_admin_bodies_are_4xx(repo, body, status, words):
    async with serve(make_settings(str(repo / "a.pt"), model_repository=repo)) as client:
        r = await client.post(
            "/v2/repository/models/tiny/load", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == status and words in r.json()["error"], r.text
        assert (await client.get("/readyz")).status_code == 200


async def test_a_link_out_of_the_repository_is_neither_listed_nor_loaded(tmp_path, tiny_artifact):
    root, outside = tmp_path / "repo", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copy(tiny_artifact, root / "a.pt")
    model.export_torchscript(make_net(seed=3), outside / "other.pt", version="9")
    (root / "innocent.pt").symlink_to(outside / "other.pt")
    (root / "folder").symlink_to(outside, target_is_directory=True)
    (root / "loop.pt").symlink_to(root / "loop.pt")
    async with serve(make_settings(str(root / "a.pt"), model_repository=root)) as client:
        rows = (await client.post("/v2/repository/index")).json()
        assert [row["path"] for row in rows] == ["a.pt"]
        for path in ("innocent.pt", "folder/other.pt", "loop.pt"):
            r = await client.post("/v2/repository/models/tiny/load", json={"parameters": {"path": path}})
            assert r.status_code == 400, (path, r.text)
        r = await client.post(
            "/v2/repository/models/tiny/load", json={}
        )  # by name: the one inside, not version 9
        assert r.status_code == 200 and r.json()["version"] == "7", r.text


async def test_metadata_that_is_not_an_object_is_not_a_model(tmp_path, tiny_artifact):
    root = _repository_with(tmp_path, tiny_artifact, list=b"[1]", string=b'"name"')
    async with serve(make_settings(str(root / "a.pt"), model_repository=root)) as client:
        rows = (await client.post("/v2/repository/index")).json()
        assert [row["path"] for row in rows] == ["a.pt"]
        assert (await client.post("/v2/repository/models/tiny/load", json={})).status_code == 200
        r = await client.post("/v2/repository/models/tiny/load", json={"parameters": {"path": "list.pt"}})
        assert r.status_code == 400 and "not a JSON object" in r.json()["error"]


async def test_oversized_metadata_is_not_read_and_scans_leave_the_event_loop_free(tmp_path, tiny_artifact):
    """A 0.5 MB metadata file blocked /healthz 6.5 s and took ~1 GB: the index scanned on the loop."""
    root = _repository_with(tmp_path, tiny_artifact, huge={"notes": ["x" * 100] * 5000})
    with pytest.raises(model.ModelLoadError, match="more than metadata may"):
        read_metadata(root / "huge.pt")
    async with serve(make_settings(str(root / "a.pt"), model_repository=root)) as client:
        rows = (await client.post("/v2/repository/index")).json()
        assert [row["path"] for row in rows] == ["a.pt"]
        r = await client.post("/v2/repository/models/tiny/load", json={"parameters": {"path": "huge.pt"}})
        assert r.status_code == 400 and "more than metadata may" in r.json()["error"]
