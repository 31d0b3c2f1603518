"""infra/prometheus: the alert rules and the compose profile's Prometheus config, checked with
promtool (Debian's `prometheus` package), and every metric they name exists."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.unit.promql import ROOT, promtool, unknown_names

PROMETHEUS = ROOT / "infra" / "prometheus"


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_rules() -> None:
    result = run(promtool(), "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_rules_cover_what_an_operator_is_paged_for() -> None:
    alerts = {rule["alert"]: rule for rule in rules()}
    assert set(alerts) == {
        "SdqTierHasNoWorker", "SdqJobWaitingTooLong", "SdqJobFailureRate",
        "SdqWebhookFailureRate", "SdqRemoteFallbacksRising", "SdqRedisMemoryNearLimit",
        "SdqMetricsDown",
    }  # fmt: skip
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert rule.get("for"), f"{name} would page on one bad scrape"


def test_every_alert_fires_in_trouble_and_not_on_a_healthy_fleet() -> None:
    """promtool compares each evaluation's alerts exactly: a healthy lane, tier or store in
    the same input that alerted too would fail it."""
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} is never shown firing"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} never quiet"
    result = run(promtool(), "test", "rules", str(PROMETHEUS / "alerts.test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_wrong_expectation_fails_promtool(tmp_path: Path) -> None:
    """The unit tests can fail: the same file, expecting the failure rate alert on a tier
    whose jobs are fine, is refused."""
    text = (PROMETHEUS / "alerts.test.yml").read_text()
    fine = "exp_labels: {severity: warning, tier: budget}"
    wrong = text.replace(fine, fine.replace("budget", "normal"))
    assert wrong != text
    (tmp_path / "alerts.yml").write_text((PROMETHEUS / "alerts.yml").read_text())
    (tmp_path / "alerts.test.yml").write_text(wrong)
    result = run(promtool(), "test", "rules", str(tmp_path / "alerts.test.yml"))
    assert result.returncode != 0 and "SdqJobFailureRate" in result.stdout + result.stderr


def test_rules_name_only_metrics_and_labels_that_exist() -> None:
    for rule in rules():
        assert unknown_names(rule["expr"]) == [], rule["alert"]


def test_the_name_check_can_fail() -> None:
    """A misspelt metric, label or value, in a matcher or a grouping, is named."""
    assert unknown_names('rate(sdq_job_total{status="failed"}[5m])') == ["metric sdq_job_total"]
    assert unknown_names('max by (tier) (sdq_queue_depth{tire="budget"})') == [
        "label tire of sdq_queue_depth"
    ]
    assert unknown_names("max by (status) (sdq_queue_depth)") == [
        "label status (by/on) of sdq_queue_depth"
    ]
    assert unknown_names('rate(sdq_jobs_total{status=~"succeeded|faild"}[5m])') == [
        'value status="faild"'
    ]
    assert unknown_names('rate(sdq_webhook_attempts_total{outcome="pending"}[5m])') == [
        'value outcome="pending"'
    ]
    # Histogram series, target labels, Grafana variables and regexes are known or left alone.
    assert (
        unknown_names(
            "histogram_quantile(0.9, sum by (le, instance) (rate(sdq_upload_seconds_bucket"
            '{tier=~"$tier", job="sdq"}[5m]))) + on () group_left vector(0)'
        )
        == []
    )


def test_prometheus_config_scrapes_the_api_with_its_token(tmp_path: Path) -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["sdq"]["metrics_path"] == "/metrics"
    assert jobs["sdq"]["static_configs"] == [{"targets": ["api:8000"]}]
    token = jobs["sdq"]["authorization"]
    assert token["type"] == "Bearer" and token["credentials_file"] == "/run/secrets/metrics-token"
    assert jobs["redis"]["static_configs"] == [{"targets": ["redis-exporter:9121"]}]
    # The compose profile mounts the token where the config reads it, from SDQ_METRICS_TOKEN.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    prometheus = compose["services"]["prometheus"]
    assert {"source": "metrics-token", "target": "metrics-token", "mode": 0o444} in prometheus[
        "secrets"
    ]
    assert compose["secrets"]["metrics-token"] == {"environment": "SDQ_METRICS_TOKEN"}
    assert "./infra/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    # promtool reads the token file, so point it at one that exists here.
    secret = tmp_path / "metrics-token"
    secret.write_text("a-token\n")
    token["credentials_file"] = str(secret)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "alerts.yml").write_text((PROMETHEUS / "alerts.yml").read_text())
    result = run(promtool(), "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
