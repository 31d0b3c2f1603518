"""docker-compose.yml, .env.example, the Dockerfiles and the Kubernetes manifests."""

from __future__ import annotations

import copy
import json
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
from common.tiers import TierConfigError, Tiers, load_tiers

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
KEDA_SCHEMA = ROOT / "infra" / "schemas" / "keda" / "scaledobject-keda-v1alpha1.json"
#: The Kubernetes release the manifests are checked against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.30"
SDQ_COMPONENTS = ["api", "worker", "dispatcher", "flower"]


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
        "worker-premium", "flower", "prometheus", "redis-exporter", "grafana",
    }  # fmt: skip
    # redis_exporter's image has no shell to run a check in; Prometheus's `up` watches it.
    assert all("healthcheck" in s for name, s in services.items() if name != "redis-exporter")
    monitoring = {name for name, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"prometheus", "redis-exporter", "grafana"}
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
    env.write_text(
        "SDQ_S3_ACCESS_KEY=a\nSDQ_S3_SECRET_KEY=b\nSDQ_FLOWER_BASIC_AUTH=u:p\n"
        "VALKEY_PASSWORD=c\nSDQ_METRICS_TOKEN=d\n"
    )
    file = str(ROOT / "docker-compose.yml")
    argv = [docker, "compose", "--env-file", str(env), "-f", file, "config", "-q"]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([*argv[:-2], "--profile", "monitoring", "config", "-q"], text=True)
    assert result.returncode == 0


def test_env_example_names_every_setting_and_loads() -> None:
    text = (ROOT / ".env.example").read_text()
    names = set(re.findall(r"^(SDQ_[A-Z0-9_]+)=", text, flags=re.MULTILINE))
    expected = {f"SDQ_{name.upper()}" for name in Settings.model_fields}
    assert expected - names == set(), "missing from .env.example"
    assert names - expected == set(), "unknown settings in .env.example"
    # As shipped (production, change-me placeholders) it is refused, naming the settings ...
    with pytest.raises(ValueError, match="SDQ_S3_SECRET_KEY is a placeholder"):
        Settings(_env_file=ROOT / ".env.example")  # type: ignore[call-arg]
    # ... and every value in it is otherwise valid.
    settings = Settings(_env_file=ROOT / ".env.example", env="development")  # type: ignore[call-arg]
    assert settings.tiers_file is None
    assert re.search(r"^SDQ_ENV=production$", text, flags=re.MULTILINE)


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
        ("NetworkPolicy", "default-deny-ingress"), ("NetworkPolicy", "sdq-redis"),
        ("NetworkPolicy", "sdq-s3"), ("NetworkPolicy", "sdq-api"),
    ]:  # fmt: skip
        assert expected in kinds
    config = next(doc for doc in manifests() if doc["kind"] == "ConfigMap")
    assert set(config["data"]) - {"SDQ_REDIS_ADDRESS", "HF_HOME"} <= {
        f"SDQ_{name.upper()}" for name in Settings.model_fields
    }


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema's vendored Compose Specification schema (no network)."""
    argv = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    return subprocess.run([*argv, str(path)], capture_output=True, text=True, timeout=60)


def test_the_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    result = check_compose_schema(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # A misspelt key is caught: the check can fail.
    broken = compose()
    broken["services"]["api"]["prots"] = broken["services"]["api"].pop("ports")
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    result = check_compose_schema(tmp_path / "docker-compose.yml")
    assert result.returncode != 0 and "prots" in result.stdout + result.stderr


def test_only_the_api_listens_beyond_loopback() -> None:
    published = {
        name: service["ports"]
        for name, service in compose()["services"].items()
        if "ports" in service
    }
    assert published.pop("api") == ["8000:8000"]
    assert published == {
        "seaweedfs": ["127.0.0.1:8333:8333"],
        "flower": ["127.0.0.1:5555:5555"],
        "prometheus": ["127.0.0.1:9090:9090"],
        "grafana": ["127.0.0.1:3000:3000"],
    }


def test_valkey_asks_for_a_password_that_every_url_carries() -> None:
    data = compose()
    services = data["services"]
    command = services["valkey"]["command"]
    assert (
        command[command.index("--requirepass") + 1]
        == "${VALKEY_PASSWORD:?set VALKEY_PASSWORD in .env}"
    )
    assert "$$VALKEY_PASSWORD" in " ".join(services["valkey"]["healthcheck"]["test"])
    url = data["x-sdq-env"]["SDQ_REDIS_URL"]
    assert url == "redis://:${VALKEY_PASSWORD:?set VALKEY_PASSWORD in .env}@valkey:6379/0"
    for name in ("api", "dispatcher", "worker-budget", "worker-normal", "worker-premium", "flower"):
        assert services[name]["environment"]["SDQ_REDIS_URL"] == url, name
    assert services["redis-exporter"]["environment"]["REDIS_PASSWORD"].startswith(
        "${VALKEY_PASSWORD"
    )
    assert data["x-sdq-env"]["SDQ_METRICS_TOKEN"].startswith("${SDQ_METRICS_TOKEN:?")


def strict(schema: Any) -> Any:
    """``schema`` refusing unknown fields wherever it lists the known ones, as
    `kubectl apply --validate=strict` does (the API server would drop them silently)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def validate_scaled_object(doc: dict[str, Any]) -> None:
    import jsonschema

    schema = strict(json.loads(KEDA_SCHEMA.read_text()))
    schema["properties"]["metadata"]["additionalProperties"] = True
    jsonschema.Draft7Validator(schema).validate(doc)
    # The CRD's one CEL rule (x-kubernetes-validations), which jsonschema does not run.
    spec = doc["spec"]
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)


def test_the_manifests_follow_the_kubernetes_and_keda_schemas() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (a dev dependency) is not installed"
    )
    kinds = set()
    for doc in manifests():
        kinds.add(doc["kind"])
        if doc["kind"] == "ScaledObject":
            assert doc["apiVersion"] == "keda.sh/v1alpha1"
            validate_scaled_object(doc)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert {"Deployment", "ScaledObject", "NetworkPolicy", "Secret", "Service"} <= kinds
    # The checks can fail: a misspelt field, a wrong type.
    deployment = next(doc for doc in manifests() if doc["kind"] == "Deployment")
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_keda_schema_refuses_what_keda_would_refuse() -> None:
    import jsonschema

    scaler = next(doc for doc in manifests() if doc["kind"] == "ScaledObject")
    validate_scaled_object(scaler)
    for path, value in [
        (("spec", "minReplicaCont"), 0),  # misspelt
        (("spec", "minReplicaCount"), -1),
        (("spec", "advanced", "scalingModifiers", "metricType"), "Utilization"),
    ]:
        bad = copy.deepcopy(scaler)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            validate_scaled_object(bad)
    too_few = copy.deepcopy(scaler)
    too_few["spec"]["minReplicaCount"] = too_few["spec"]["maxReplicaCount"] + 1
    with pytest.raises(AssertionError):
        validate_scaled_object(too_few)


def test_a_tier_with_min_workers_0_scales_to_zero(tmp_path: Path) -> None:
    tiers_file = tmp_path / "tiers.toml"
    tiers_file.write_text(
        '[tiers.night]\nqueue = "sdq.night"\nhardware = ["l4"]\nmin_workers = 0\n'
        "default_steps = 20\nmax_steps = 30\nmax_side = 1024\nprice = 1\n"
        '[tiers.day]\nqueue = "sdq.day"\nhardware = ["a100"]\n'
        "default_steps = 20\nmax_steps = 30\nmax_side = 1024\nprice = 1\n"
    )
    result = subprocess.run(
        [sys.executable, str(K8S / "render.py"), "--tiers", str(tiers_file)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout)}
    night = docs[("ScaledObject", "sdq-worker-night")]["spec"]
    day = docs[("ScaledObject", "sdq-worker-day")]["spec"]
    assert night["minReplicaCount"] == 0 and day["minReplicaCount"] == 1
    assert docs[("Deployment", "sdq-worker-night")]["spec"]["replicas"] == 0
    # One waiting job (of any priority) wakes it: activity is the summed lists' > 0.
    assert night["advanced"]["scalingModifiers"]["activationTarget"] == "0"
    assert "activationTarget (0)" in result.stdout.split("apiVersion", 1)[0]
    for doc in docs.values():
        if doc["kind"] == "ScaledObject":
            validate_scaled_object(doc)
    # The shipped tiers keep a worker per pair.
    assert all(tier.min_workers == 1 for tier in load_tiers())
    with pytest.raises(TierConfigError, match="min_workers"):
        Tiers.from_toml(tiers_file.read_text().replace("min_workers = 0", "min_workers = -1"))


def test_scalers_read_redis_with_its_password() -> None:
    secret = next(doc for doc in manifests() if doc["kind"] == "Secret")["stringData"]
    password = secret["REDIS_PASSWORD"]
    assert secret["SDQ_REDIS_URL"] == f"redis://:{password}@valkey.sdq.svc:6379/0"
    assert password.startswith("change-me-")
    for doc in manifests():
        if doc["kind"] == "ScaledObject":
            for trigger in doc["spec"]["triggers"]:
                assert trigger["metadata"]["passwordFromEnv"] == "REDIS_PASSWORD"
                assert trigger["metadata"]["addressFromEnv"] == "SDQ_REDIS_ADDRESS"


def pod_labels() -> dict[str, dict[str, str]]:
    return {
        doc["metadata"]["name"]: doc["spec"]["template"]["metadata"]["labels"]
        for doc in manifests()
        if doc["kind"] == "Deployment"
    }


def test_network_policies_let_only_sdq_reach_redis_and_s3() -> None:
    policies = {
        d["metadata"]["name"]: d["spec"] for d in manifests() if d["kind"] == "NetworkPolicy"
    }
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    # Every sdq pod carries the component label the policies select on.
    components = {name: labels["sdq.dev/component"] for name, labels in pod_labels().items()}
    assert set(components.values()) == set(SDQ_COMPONENTS)
    assert all(v == "worker" for k, v in components.items() if k.startswith("sdq-worker-"))
    sdq_pods = {
        "podSelector": {
            "matchExpressions": [
                {"key": "sdq.dev/component", "operator": "In", "values": SDQ_COMPONENTS}
            ]
        }
    }
    for name, store, port in [
        ("sdq-redis", "valkey", 6379),
        ("sdq-s3", "seaweedfs", 8333),
    ]:
        spec = policies[name]
        assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": store}}
        to_port, among_themselves = spec["ingress"]
        assert to_port["ports"] == [{"protocol": "TCP", "port": port}]
        assert to_port["from"][0] == sdq_pods
        # Nothing else: no ipBlock, no namespace but KEDA's operator (it reads the queues).
        assert [peer for peer in to_port["from"][1:] if "ipBlock" in peer] == []
        for peer in to_port["from"][1:]:
            assert name == "sdq-redis"
            assert peer["namespaceSelector"] == {
                "matchLabels": {"kubernetes.io/metadata.name": "keda"}
            }
        assert among_themselves == {
            "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": store}}}]
        }
    # The API takes traffic on its own port only; Flower on none.
    api = policies["sdq-api"]
    assert api["podSelector"] == {"matchLabels": {"sdq.dev/component": "api"}}
    assert api["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8000}]}]
    assert not any(
        p["podSelector"].get("matchLabels", {}).get("sdq.dev/component") == "flower"
        for p in policies.values()
    )
    # The selectors match the pods' service addresses in the ConfigMap and Secret.
    config = next(d for d in manifests() if d["kind"] == "ConfigMap")["data"]
    assert config["SDQ_REDIS_ADDRESS"] == "valkey.sdq.svc:6379"
    assert config["SDQ_S3_ENDPOINT_URL"] == "http://seaweedfs-s3.sdq.svc:8333"
