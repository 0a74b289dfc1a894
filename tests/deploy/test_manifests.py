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

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def run(*cmd: str, cwd: Path = ROOT) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


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
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop
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


def test_kserve_inference_service_parses():
    doc = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    container = doc["spec"]["predictor"]["containers"][0]
    assert container["image"].startswith("chanseg") and container["ports"][0]["containerPort"] == 8000
    assert {"name": "PROTOCOL", "value": "v2"} in container["env"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_hadolint_dockerfile():
    run(tool("hadolint"), str(ROOT / "Dockerfile"))


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
