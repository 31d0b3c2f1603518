"""docker-compose.yml, .env.example, the Dockerfiles and the Kubernetes manifests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.queue import MAX_PRIORITY
from common.settings import Settings
from common.tiers import load_tiers

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def test_compose_services_and_health_checks() -> None:
    services = compose()["services"]
    assert set(services) == {
        "valkey", "seaweedfs", "api", "dispatcher", "worker-budget", "worker-normal",
        "worker-premium", "flower",
    }  # fmt: skip
    assert all("healthcheck" in service for service in services.values())
    valkey = " ".join(services["valkey"]["command"])
    assert "--appendonly yes" in valkey and "--maxmemory-policy noeviction" in valkey
    assert "-s3" in services["seaweedfs"]["command"]
    for tier in ("normal", "premium"):
        devices = services[f"worker-{tier}"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["worker-budget"]
    assert services["worker-budget"]["environment"]["SDQ_MODEL"] == "/models/tiny-sdxl"
    assert "SDQ_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    # Webhooks go out from their own service, not from the API.
    assert services["dispatcher"]["command"] == ["sdq", "dispatcher"]
    assert services["dispatcher"]["image"] == services["api"]["image"]
    api_env = services["api"]["environment"]
    assert api_env.pop("SDQ_WEBHOOK_DISPATCHER") == "0"
    assert services["dispatcher"]["environment"] == api_env


def test_docker_compose_config_accepts_it(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "compose", "version"], capture_output=True).returncode
    ):
        pytest.skip("the docker compose CLI is not installed here")
    env = tmp_path / ".env"
    env.write_text("SDQ_S3_ACCESS_KEY=a\nSDQ_S3_SECRET_KEY=b\nSDQ_FLOWER_BASIC_AUTH=u:p\n")
    file = str(ROOT / "docker-compose.yml")
    argv = [docker, "compose", "--env-file", str(env), "-f", file, "config", "-q"]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_env_example_names_every_setting_and_loads() -> None:
    text = (ROOT / ".env.example").read_text()
    names = set(re.findall(r"^(SDQ_[A-Z0-9_]+)=", text, flags=re.MULTILINE))
    expected = {f"SDQ_{name.upper()}" for name in Settings.model_fields}
    assert expected - names == set(), "missing from .env.example"
    assert names - expected == set(), "unknown settings in .env.example"
    settings = Settings(_env_file=ROOT / ".env.example")  # type: ignore[call-arg]
    assert settings.env == "production" and settings.tiers_file is None


def test_the_api_image_has_no_torch() -> None:
    api = (ROOT / "infra" / "Dockerfile.api").read_text()
    assert "pip install '.[api]'" in api and "worker" not in api.split("RUN", 1)[1].split("\n")[0]
    assert "pytorch/pytorch" in (ROOT / "infra" / "Dockerfile.worker").read_text()


def test_workers_yaml_is_rendered_from_the_tiers_file() -> None:
    result = subprocess.run(
        [sys.executable, str(K8S / "render.py")], capture_output=True, text=True, check=True
    )
    assert result.stdout == (K8S / "workers.yaml").read_text(), "run `make k8s`"


def test_every_tier_and_model_has_a_worker_and_a_scaler_on_its_queue() -> None:
    docs = manifests()
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    pairs = load_tiers().lanes()
    workers = [name for name in by_kind["Deployment"] if name.startswith("sdq-worker-")]
    assert len(workers) == len(pairs) == 8
    for tier, model, _lane, queue in pairs:
        name = f"sdq-worker-{tier.name}" + ("" if model == tier.default_model else f"-{model}")
        deployment = by_kind["Deployment"][name]
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["args"] == ["sdq", "worker", "--tier", tier.name, "--model", model]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["terminationGracePeriodSeconds"] >= 600
        term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        match = term["nodeSelectorTerms"][0]["matchExpressions"][0]
        assert match["key"] == "sdq.dev/gpu-class" and match["values"] == tier.hardware
        scaler = by_kind["ScaledObject"][name]
        assert scaler["spec"]["scaleTargetRef"]["name"] == name
        lists = {t["metadata"]["listName"] for t in scaler["spec"]["triggers"]}
        expected = {queue} | {f"{queue}:{p}" for p in range(1, MAX_PRIORITY + 1)}
        assert lists == expected
        formula = scaler["spec"]["advanced"]["scalingModifiers"]["formula"]
        assert formula.count("+") == MAX_PRIORITY


def test_webhooks_go_out_from_the_dispatcher_deployment() -> None:
    deployments = {
        doc["metadata"]["name"]: doc for doc in manifests() if doc["kind"] == "Deployment"
    }
    [dispatcher] = deployments["sdq-dispatcher"]["spec"]["template"]["spec"]["containers"]
    [api] = deployments["sdq-api"]["spec"]["template"]["spec"]["containers"]
    assert dispatcher["args"] == ["sdq", "dispatcher"] and dispatcher["image"] == api["image"]
    assert dispatcher["envFrom"] == api["envFrom"]
    assert {"name": "SDQ_WEBHOOK_DISPATCHER", "value": "0"} in api["env"]


def test_api_flower_secret_and_config() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in manifests()}
    for expected in [
        ("Deployment", "sdq-api"), ("Service", "sdq-api"), ("HorizontalPodAutoscaler", "sdq-api"),
        ("Deployment", "sdq-flower"), ("Service", "sdq-flower"), ("Deployment", "sdq-dispatcher"),
        ("ConfigMap", "sdq-config"), ("Secret", "sdq-secrets"), ("Namespace", "sdq"),
    ]:  # fmt: skip
        assert expected in kinds
    config = next(doc for doc in manifests() if doc["kind"] == "ConfigMap")
    assert set(config["data"]) - {"SDQ_REDIS_ADDRESS", "HF_HOME"} <= {
        f"SDQ_{name.upper()}" for name in Settings.model_fields
    }
