"""chanseg on a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``:
a head node and a second node joining it, each its own raylet and object store),
through Ray Serve's HTTP proxy, with the application ``service.ray_serve:build``
makes (two replicas, at most one per node; the long form, ``CHANSEG_RELIABILITY=long``
or ``make reliability``, starts with one and adds the redeploy):

- the replicas run on both nodes and both answer requests (Ray's state API for where
  each replica actor lives, the ``X-Ray-Replica``/``X-Ray-Node`` headers for which one
  answered);
- masks through Ray equal ``/predict`` on a single chanseg app, and bad input gets the
  same 4xx;
- (long form) under load (6 requests in flight, a target of 2 per replica) Serve scales
  out from one replica to two;
- one replica killed (``ray.kill``) under a closed loop of requests: Serve starts a new
  one on the same node, the load goes on, and only requests in flight at the kill (sent
  before it, or in the second until the actor is gone) may fail;
- (long form) a redeploy under load (Serve starts the new version, then stops each old replica: Ray
  waits for its requests, then chanseg's lifespan drains it): every request answers 200;
- ``deploy/ray/serve.yaml`` passes Serve's schema and its arguments build the app.

The head node's proxy spreads requests over both nodes here
(``RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0``); in a real cluster every node runs
a proxy that prefers its own replicas. Prints the figures (``pytest -s``)."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from testbed.processes import free_port
from tests.deploy.closed_loop import ClosedLoop
from tests.real_parts import missing
from tests.service.conftest import decode_mask, make_settings, png_bytes, random_image, serve

try:
    import ray
    from ray import serve as ray_serve
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors
except ImportError:  # pragma: no cover - the ray extra is part of make test
    ray = None

pytestmark = [pytest.mark.real_part("ray cluster"), pytest.mark.slow]

APP = "chanseg"
# make test-all: two replicas from the start, both nodes serving, masks, errors, a killed replica.
# CHANSEG_RELIABILITY=long (make reliability): one replica scaling out to two under load
# first, and a redeploy under load at the end.
LONG = os.environ.get("CHANSEG_RELIABILITY", "short") == "long"
KILL_SETTLES_S = 1.0  # from ray.kill to the actor's death and the routers knowing it
IMAGES = [png_bytes(random_image(seed, h, w)) for seed, (h, w) in enumerate([(48, 40), (300, 200), (64, 64)])]


def _need_ray() -> None:
    if ray is None:
        missing("ray (Ray Serve)", "pip install 'chanseg[ray]'")


def _replica_actors() -> list:
    """The live replica actors of the deployment, from Ray's state API."""
    return list_actors(filters=[("class_name", "=", f"ServeReplica:{APP}:chanseg"), ("state", "=", "ALIVE")])


def _replicas() -> dict:
    """Replica id (as in ``X-Ray-Replica``) -> the id of the node its actor lives on."""
    return {a.name.rsplit("#", 1)[-1]: a.node_id for a in _replica_actors()}


def _running_replicas() -> int:
    status = ray_serve.status().applications.get(APP)
    return status.deployments["chanseg"].replica_states.get("RUNNING", 0) if status else 0


def _wait(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def cluster(tiny_artifact):
    """Two Ray nodes on loopback, Serve's proxy on the head, chanseg deployed on both."""
    _need_ray()
    env = {
        "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # ongoing-request counts reach the autoscaler every second, not every 10 s
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the nodes' processes inherit it
    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "dashboard_port": free_port(), "include_dashboard": True},
    )
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, logging_level="warning", log_to_driver=False)
        port = free_port()
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        args = dict(
            model_path=tiny_artifact,
            device="cpu",
            max_batch_size=4,
            max_upload_bytes=1 << 20,
            log_level="warning",
            num_cpus=1,
            min_replicas=1 if LONG else 2,  # long form: scales out to the second node under load
            max_replicas=2,
            max_replicas_per_node=1,
            target_ongoing_requests=2,
            upscale_delay_s=1,
            look_back_period_s=2,
        )
        from service.ray_serve import build

        started = time.perf_counter()
        ray_serve.run(build(args), name=APP, route_prefix="/")
        print(
            f"\nRay: {'the first replica' if LONG else 'two replicas'} ready {time.perf_counter() - started:.1f} s after the deploy"
        )
        yield {
            "url": f"http://127.0.0.1:{port}",
            "args": args,
            "node_ids": {n["NodeID"] for n in ray.nodes()},
        }
    finally:
        if ray.is_initialized():
            ray_serve.shutdown()
            ray.shutdown()
        nodes.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _load(url: str, clients: int = 4) -> ClosedLoop:
    """Clients posting the three images through Ray's proxy; answers keep who answered."""
    return ClosedLoop(url, IMAGES, ("x-ray-replica", "x-ray-node"), clients)


def test_replicas_on_both_nodes_serve(cluster):
    """Long form: one replica idle, then under load (6 in flight, target 2 per replica)
    Serve adds the second, on the other node. Both forms: both replicas answer."""
    scaled = None
    with _load(cluster["url"], clients=6) as load:
        if LONG:
            assert len(_replica_actors()) == 1
            started = time.monotonic()
            _wait(lambda: _running_replicas() == 2, "Serve scaled out to two replicas")
            scaled = time.monotonic() - started
        settled = load.count()
        _wait(lambda: load.count() >= settled + 60, "60 requests through Ray on two replicas")
    actors = _replica_actors()
    assert len(actors) == 2
    assert {a.node_id for a in actors} == cluster["node_ids"], (
        "one replica on each node (max_replicas_per_node=1)"
    )
    statuses = Counter(r[2] for r in load.answers)
    assert statuses == {200: len(load.answers)}, statuses
    answered = Counter((r[3], r[4]) for r in load.answers)
    assert set(answered) == set(_replicas().items()), answered  # both replicas, each on its own node
    print(
        (f"Ray: scaled out {scaled:.1f} s after the load began; " if scaled is not None else "Ray: ")
        + f"{len(load.answers)} requests, per replica {dict(Counter(r[3] for r in load.answers))}"
    )


@pytest.mark.anyio
async def test_masks_and_errors_equal_a_single_server(cluster, tiny_artifact):
    single = make_settings(tiny_artifact, max_batch_size=4, max_upload_bytes=1 << 20)
    async with serve(single) as alone, httpx.AsyncClient(base_url=cluster["url"], timeout=60) as via_ray:
        for image in IMAGES:
            files = {"file": ("i.png", image, "image/png")}
            mine, theirs = (
                await via_ray.post("/predict?format=png", files=files),
                await alone.post("/predict?format=png", files=files),
            )
            assert mine.status_code == theirs.status_code == 200
            assert np.array_equal(decode_mask(mine.content), decode_mask(theirs.content))
            mine, theirs = (
                await via_ray.post("/predict", files=files),
                await alone.post("/predict", files=files),
            )
            assert (
                mine.json()["predictions"][0]["class_fractions"]
                == theirs.json()["predictions"][0]["class_fractions"]
            )
        bad = [
            {"files": {"file": ("a.txt", b"not an image", "text/plain")}},  # 400
            {"files": {"file": ("big.png", b"\0" * (2 << 20), "image/png")}},  # 413: over MAX_UPLOAD_BYTES
            {"content": b"{}", "headers": {"content-type": "application/json"}},  # 4xx: not multipart
        ]
        for request in bad:
            mine, theirs = await via_ray.post("/predict", **request), await alone.post("/predict", **request)
            assert 400 <= mine.status_code < 500 and mine.status_code == theirs.status_code, mine.text
            assert mine.json()["detail"] == theirs.json()["detail"]
        info = await via_ray.get("/v1/model")
        assert info.status_code == 200 and info.json()["version"] == "7"


def _failed_only_in_flight(results: list, killed_at: float) -> tuple:
    """Requests that failed, and those of them sent after the kill."""
    failed = [r for r in results if r[2] != 200]
    return failed, [r for r in failed if r[0] > killed_at]


def test_killed_replica_is_replaced_under_load(cluster):
    before = {a.name.rsplit("#", 1)[-1]: a for a in _replica_actors()}
    victim_id, victim = sorted(before.items())[0]
    with _load(cluster["url"]) as load:
        _wait(lambda: load.count() >= 20, "load through Ray before the kill")
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
        _wait(
            lambda: _running_replicas() == 2 and _replicas().keys() - before.keys(),
            "Serve replaced the killed replica",
        )
        replaced_at = time.monotonic()
        settled = load.count()
        _wait(lambda: load.count() >= settled + 30, "load after the replacement")
    ((new_id, new_node),) = [(i, node) for i, node in _replicas().items() if i not in before]
    failed = [r for r in load.answers if r[2] != 200]
    during = [r for r in load.answers if killed_at < r[0] < replaced_at]
    after = [r for r in load.answers if r[0] > replaced_at]
    print(
        f"Ray: replica {victim_id} killed; {new_id} running {replaced_at - killed_at:.1f} s later; "
        f"{len(load.answers)} requests, {len(failed)} failed (statuses {dict(Counter(r[2] for r in failed))}), "
        f"{sum(r[2] == 200 for r in during)} answered 200 while it was replaced"
    )
    assert new_node == victim.node_id, "max_replicas_per_node=1: the new replica takes the free node"
    # ray.kill returns before the actor is gone: a request sent in that moment may still reach it
    assert not [r for r in failed if r[0] > killed_at + KILL_SETTLES_S], (
        "a request sent after the kill failed"
    )
    assert len(failed) <= 4, "at most the clients' requests in flight at the kill"
    assert sum(r[2] == 200 for r in during) > 0, "the load went on while the replica was replaced"
    assert after and all(r[2] == 200 for r in after)
    assert new_id in {r[3] for r in after}, "the new replica serves"


def test_redeploy_under_load_drains_every_old_replica(cluster):
    """A new version (here: one replica, another batch delay) under load: Serve starts the
    new replica, stops routing to the old ones, waits for their requests, then chanseg's
    lifespan drains each; every request answers 200."""
    if not LONG:
        pytest.skip("the long form's (CHANSEG_RELIABILITY=long, make reliability)")
    from service.ray_serve import build

    before = _replicas()
    assert len(before) == 2
    args = {**cluster["args"], "max_batch_delay_ms": 4, "min_replicas": 1, "max_replicas": 1}
    with _load(cluster["url"]) as load:
        _wait(lambda: load.count() >= 20, "load through Ray before the redeploy")
        started = time.monotonic()
        ray_serve.run(build(args), name=APP, route_prefix="/", blocking=False)
        _wait(
            lambda: len(_replicas()) == 1 and not _replicas().keys() & before.keys(), "the old replicas gone"
        )
        took = time.monotonic() - started
        settled = load.count()
        _wait(lambda: load.count() >= settled + 20, "load after the redeploy")
    statuses = Counter(r[2] for r in load.answers)
    print(
        f"Ray: redeploy under load took {took:.1f} s; {len(load.answers)} requests, statuses {dict(statuses)}"
    )
    assert statuses == {200: len(load.answers)}, statuses
    assert {r[3] for r in load.answers[-10:]} == _replicas().keys(), "the new replica serves"


def test_serve_config_builds():
    """deploy/ray/serve.yaml passes Serve's own schema, and its arguments build the app."""
    _need_ray()
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from service.ray_serve import build, deployment_options, split_args
    from service.settings import Settings

    path = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "serve.yaml"
    (app,) = ServeDeploySchema(**yaml.safe_load(path.read_text())).applications
    assert app.import_path == "service.ray_serve:build"
    assert isinstance(build(app.args), ray_serve.Application)
    settings_args, ray_args = split_args(app.args)
    settings = Settings(**settings_args)
    options = deployment_options(settings, ray_args)
    assert options["graceful_shutdown_timeout_s"] == settings.drain_timeout_s == 25
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}
    scaling = options["autoscaling_config"]
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 8, 16)
    assert options["max_ongoing_requests"] == 32
    on_gpu = deployment_options(Settings(device="cuda"), {})
    assert on_gpu["ray_actor_options"]["num_gpus"] == 1


def test_check_health_fails_when_liveness_would():
    """Serve's health check is /healthz's: a stuck batch or a lost device fails it, so Serve
    replaces the replica."""
    _need_ray()
    from service.ray_serve import ChansegReplica
    from service.state import ServerState

    state = ServerState(settings=make_settings("unused"), metrics=None)
    replica = SimpleNamespace(state=state)
    ChansegReplica.check_health(replica)  # well: no exception
    state.device_error = "CUDA error: an illegal memory access was encountered"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        ChansegReplica.check_health(replica)
    state.device_error, state.watchdog_s = None, 1.0
    state.batcher = SimpleNamespace(busy_for=30.0, busiest_thread=None)  # one batch running for 30 s
    with pytest.raises(RuntimeError, match="running for 30 s"):
        ChansegReplica.check_health(replica)
