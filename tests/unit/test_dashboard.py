"""infra/grafana: the provisioned dashboard reads what sdq exposes, through the provisioned
datasource, and the compose profile `monitoring` wires them together."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.unit.promql import ROOT, exposed, promtool, reads, unknown_names

GRAFANA = ROOT / "infra" / "grafana"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GRAFANA / "dashboards" / "sdq.json").read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def exprs() -> dict[str, list[str]]:
    """Each panel's title and its queries."""
    return {panel["title"]: [t["expr"] for t in panel["targets"]] for panel in panels()}


def provisioned_datasource() -> dict[str, Any]:
    path = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
    [source] = yaml.safe_load(path.read_text())["datasources"]
    return dict(source)


def test_every_query_reads_the_provisioned_datasource_by_uid() -> None:
    board = dashboard()
    assert board["uid"] == "sdq-overview" and board["id"] is None
    [variable] = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    source = provisioned_datasource()
    assert variable["name"] == "datasource" and variable["query"] == source["type"] == "prometheus"
    assert variable["current"]["value"] == source["uid"] == "sdq-prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    # Nothing refers to a datasource by name, or by a numeric id of one Grafana's database.
    assert all(ref == DATASOURCE for ref in datasource_refs(board)), datasource_refs(board)
    assert '"datasourceId"' not in json.dumps(board)


def datasource_refs(node: Any) -> list[Any]:
    """Every value of a "datasource" key, anywhere in ``node``."""
    if isinstance(node, dict):
        found = [value for key, value in node.items() if key == "datasource"]
        return found + [ref for value in node.values() for ref in datasource_refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in datasource_refs(item)]
    return []


def test_the_dashboard_shows_what_an_operator_looks_for() -> None:
    queries = exprs()
    depth = next(q for q in queries["Queue depth"])
    assert reads(depth).metrics == {"sdq_queue_depth"} and reads(depth).grouping == {
        "tier",
        "model",
    }
    oldest = next(q for q in queries["Oldest waiting job"])
    assert reads(oldest).metrics == {"sdq_queue_oldest_age_seconds"}
    assert reads(oldest).grouping == {"tier", "model"}
    assert "sum by (status)" in queries["Jobs by status"][0]
    assert "rate(sdq_jobs_total" in queries["Jobs by status"][0]
    for title, histogram in [
        ("Generation time", "sdq_generation_seconds"),
        ("Upload time", "sdq_upload_seconds"),
        ("End to end", "sdq_job_duration_seconds"),
        ("Queue wait", "sdq_queue_wait_seconds"),
    ]:
        quantiles = [
            float(re.findall(r"histogram_quantile\(([\d.]+),", q)[0]) for q in queries[title]
        ]
        assert quantiles == [0.5, 0.95, 0.99], title
        assert all(f"{histogram}_bucket" in q and "by (le, tier)" in q for q in queries[title])
    assert "sdq_webhook_attempts_total" in queries["Webhook attempts by outcome"][0]
    assert "by (outcome)" in queries["Webhook attempts by outcome"][0]
    assert "sdq_remote_fallbacks_total" in queries["Remote fallbacks"][0]
    assert ["sdq_credits_debited_total" in q for q in queries["Credits"]] == [True, False]
    assert "sdq_credits_refunded_total" in queries["Credits"][1]


def test_every_sdq_metric_has_a_panel_and_every_panel_reads_real_metrics() -> None:
    used: set[str] = set()
    for title, queries in exprs().items():
        for expr in queries:
            assert unknown_names(expr) == [], f"{title}: {expr}"
            used |= reads(expr).metrics
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exposed()}
    assert families - {re.sub(r"_bucket$", "", name) for name in used} == set()


def test_the_variables_list_labels_that_exist() -> None:
    """The tier and model pickers: `label_values(metric{...}, label)` of a real metric and
    one of its labels."""
    variables = [v for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    assert [v["name"] for v in variables] == ["tier", "model"]
    known = exposed()
    for variable in variables:
        query = variable["query"]["query"]
        assert variable["definition"] == query
        match = re.fullmatch(r"label_values\((\w+)(\{[^}]*\})?, (\w+)\)", query)
        assert match, query
        metric, selector, label = match.groups()
        assert label == variable["name"] and label in known[metric], query
        assert unknown_names(metric + (selector or "")) == [], query
        assert variable["datasource"] == DATASOURCE
        # Every panel filters on it.
        for title, queries in exprs().items():
            for expr in queries:
                if label in {
                    *reads(expr).grouping,
                    *(name for _metric, name in reads(expr).matchers),
                }:
                    assert f'{label}=~"${label}"' in expr, title


def test_histograms_are_summed_over_le_before_the_quantile() -> None:
    for title, queries in exprs().items():
        for expr in queries:
            if "histogram_quantile" in expr:
                assert re.search(r"sum by \(le, [^)]*\) \(max by \(le, ", expr), title


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    """Grafana's variables replaced by what it would send, each query becomes a recording
    rule that promtool checks."""
    substitutions = {"$__rate_interval": "1m", "$__range": "6h", "$tier": ".*", "$model": ".*"}
    records = []
    for index, expr in enumerate(e for queries in exprs().values() for e in queries):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        records.append({"record": f"sdq:dashboard:{index}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(records)} rules found" in result.stdout


def test_the_monitoring_profile_provisions_grafana() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    grafana, prometheus = services["grafana"], services["prometheus"]
    assert grafana["profiles"] == prometheus["profiles"] == ["monitoring"]
    assert all("profiles" not in services[name] for name in ("api", "valkey", "seaweedfs"))
    assert "./infra/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    provider_file = GRAFANA / "provisioning" / "dashboards" / "sdq.yml"
    [provider] = yaml.safe_load(provider_file.read_text())["providers"]
    assert f"./infra/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/sdq.json"
    # The datasource's address is the profile's Prometheus, on the port it listens on.
    assert provisioned_datasource()["url"] == "http://prometheus:9090"
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"]
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
