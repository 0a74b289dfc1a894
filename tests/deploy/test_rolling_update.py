"""Three replicas behind a real HAProxy (Debian's), configured as deploy/haproxy/haproxy.cfg
has it, under a steady closed loop of requests:

- a rolling update, one replica at a time as ``kubectl rollout`` does with the manifests'
  ``maxUnavailable: 1, maxSurge: 0`` and ``preStop`` (all three with
  ``CHANSEG_RELIABILITY=long``, the first in ``make test-all``): out of the pool (the endpoints
  controller), a pause (preStop), SIGTERM, wait for the exit, start the new version on
  the same port, wait for ``/readyz``, back in the pool; every request answers 200, and
  each replaced replica answers with version 8;
- a replica killed with SIGKILL: only requests that were inside it may fail, none that
  start after the load balancer's next health check.

Prints the figures (``pytest -s``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

import model
from testbed.processes import free_port
from tests.conftest import make_net
from tests.deploy.closed_loop import ClosedLoop
from tests.real_parts import need_tool
from tests.service.conftest import ServerProcess, png_bytes, random_image

pytestmark = pytest.mark.slow  # a real server, a real part or a compile: make test-all

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
PRE_STOP_S = 0.5  # the manifests' preStop sleep is 5 s; the pool change here is immediate
# make test-all rolls one replica (the short form: each replica's turn is the same steps);
# CHANSEG_RELIABILITY=long (make reliability) all three, as a rollout does.
ROLL = ("r1", "r2", "r3") if os.environ.get("CHANSEG_RELIABILITY", "short") == "long" else ("r1",)
CHECK_S = 1.0  # haproxy.cfg: inter 1s fall 1


class Balancer:
    """HAProxy in the foreground with the repository's config, and its runtime API."""

    def __init__(self, replicas: dict, tmp: Path) -> None:
        binary = need_tool("haproxy", "apt-get install haproxy")
        self.port, self.socket = free_port(), str(tmp / "haproxy.sock")
        env = {**os.environ, "LISTEN": f"127.0.0.1:{self.port}", "STATS_SOCKET": self.socket}
        env.update({name.upper(): f"127.0.0.1:{proc.port}" for name, proc in replicas.items()})
        with open(tmp / "haproxy.log", "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [binary, "-db", "-f", str(CONFIG)], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.socket)
            s.sendall(line.encode() + b"\n")
            return b"".join(iter(lambda: s.recv(65536), b"")).decode()

    def up(self) -> set:
        """The replicas HAProxy has in the pool now (none while it is still starting)."""
        try:
            stats = self.command("show stat")
        except OSError:  # the stats socket is not there yet
            return set()
        rows = [line.split(",") for line in stats.splitlines() if line.startswith("chanseg,r")]
        return {row[1] for row in rows if row[17] == "UP"}

    def wait_until(self, condition, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{what}: in the pool {self.up()}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.mark.reliability
@pytest.mark.real_part("haproxy")
def test_rolling_update_and_a_killed_replica_behind_haproxy(tmp_path):
    old, new = tmp_path / "v7.pt", tmp_path / "v8.pt"
    model.export_torchscript(make_net(seed=0), old, version="7")
    model.export_torchscript(make_net(seed=1), new, version="8")
    settings = {"CHANSEG_DRAIN_TIMEOUT_S": "10"}
    replicas = {f"r{i}": ServerProcess(str(old), tmp_path, **settings) for i in (1, 2, 3)}
    balancer, load = None, None
    try:
        for proc in replicas.values():
            proc.wait_ready(120)
        balancer = Balancer(replicas, tmp_path)
        balancer.wait_until(lambda: balancer.up() == {"r1", "r2", "r3"}, "replicas never all up")
        load = ClosedLoop(
            balancer.url, [png_bytes(random_image(61, 64, 64))], ("x-replica", "x-model-version")
        )
        time.sleep(1.0)

        # The rolling update: one replica at a time.
        rollout_started = time.monotonic()
        steps = []
        for name in ROLL:
            t0 = time.monotonic()
            balancer.command(f"set server chanseg/{name} state drain")  # the pod leaves the endpoints
            time.sleep(PRE_STOP_S)
            proc = replicas[name]
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(30) == 0, proc.output()[-2000:]  # drained, nothing cut off
            t1 = time.monotonic()
            replicas[name] = ServerProcess(str(new), tmp_path, port=proc.port, **settings)
            replicas[name].wait_ready(120)
            t2 = time.monotonic()
            balancer.command(f"set server chanseg/{name} state ready")
            balancer.wait_until(lambda n=name: n in balancer.up(), f"{name} never came back")
            steps.append((t1 - t0, t2 - t1, time.monotonic() - t2))
        rollout_s = time.monotonic() - rollout_started
        back_at = time.monotonic()
        time.sleep(1.0)

        # A replica killed under load.
        killed_at = time.monotonic()
        replicas["r2"].proc.kill()
        balancer.wait_until(lambda: "r2" not in balancer.up(), "the killed replica stayed in the pool", 10)
        out_at = time.monotonic()
        time.sleep(3.0)
        answers = load.finish()
    finally:
        if load is not None:
            load.finish()
        if balancer is not None:
            balancer.stop()
        for proc in replicas.values():
            proc.stop()

    during_rollout = [a for a in answers if rollout_started <= a[0] and a[1] <= killed_at]
    assert during_rollout and all(a[2] == 200 for a in during_rollout), Counter(a[2] for a in during_rollout)
    versions = [a[4] for a in sorted(during_rollout)]
    assert versions[0] == "7" and set(versions) == {"7", "8"}
    assert Counter(a[3] for a in during_rollout).keys() == {"r1", "r2", "r3"}
    rolled = {a[4] for a in answers if a[3] in ROLL and a[0] > back_at}
    assert rolled == {"8"}, rolled  # the replaced replicas serve the new version
    # Answered by a replica left alone: a request the SIGKILL cut off (checked below) has no replica.
    kept = {a[4] for a in answers if a[2] == 200 and a[3] not in ROLL}
    assert kept == ({"7"} if len(ROLL) < len(replicas) else set())  # the long form rolls all three

    after_kill = [a for a in answers if a[1] > killed_at]
    failed = [a for a in after_kill if a[2] != 200]
    assert len(failed) <= 3, failed  # at most the requests inside the killed replica (3 clients)
    assert all(a[0] < killed_at + CHECK_S + 0.5 for a in failed), failed  # none after the next health check
    late = [a for a in after_kill if a[0] > out_at]
    assert late and all(a[2] == 200 and a[3] != "r2" for a in late)

    latencies = sorted(a[1] - a[0] for a in during_rollout)
    print(
        f"\nrolling update of {len(ROLL)} of 3 replicas behind HAProxy: {rollout_s:.1f} s, {len(during_rollout)} requests, "
        f"all 200 (p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms); "
        f"SIGKILL of one replica: {len(failed)} of {len(after_kill)} requests failed, "
        f"out of the pool after {out_at - killed_at:.2f} s; per replica (stop, start, back in the pool): "
        + ", ".join(f"{a:.1f}/{b:.1f}/{c:.1f} s" for a, b, c in steps)
    )


@pytest.mark.real_part("haproxy")
def test_haproxy_config_is_valid_and_the_compose_file_runs_it(tmp_path):
    import yaml

    binary = need_tool("haproxy", "apt-get install haproxy")
    env = {**os.environ, "LISTEN": f"127.0.0.1:{free_port()}", "STATS_SOCKET": str(tmp_path / "s.sock")}
    env.update({f"R{i}": f"127.0.0.1:{9000 + i}" for i in (1, 2, 3)})
    check = subprocess.run([binary, "-c", "-f", str(CONFIG)], env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    compose = yaml.safe_load((CONFIG.parent / "docker-compose.yml").read_text())
    replicas = {name for name in compose["services"] if name.startswith("chanseg-")}
    lb = compose["services"]["haproxy"]
    assert (
        {lb["environment"][f"R{i}"].split(":")[0] for i in (1, 2, 3)}
        == replicas
        == {"chanseg-1", "chanseg-2", "chanseg-3"}
    )
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    assert all(compose["services"][r]["image"] == "chanseg:latest" for r in replicas)
