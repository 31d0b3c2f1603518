"""A real scrape of the API's /metrics passes `promtool check metrics`, and serves exactly the
metric families common/metrics.py declares (the ones the alert rules and the dashboard read)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import COUNTERS, GAUGES, HISTOGRAMS
from producer.client import Client
from tests.unit.promql import promtool


def test_a_scrape_passes_promtool_and_holds_the_declared_families(
    api_url: str, env: dict[str, str], new_key: Callable[..., str]
) -> None:
    tool = promtool()
    # One finished job, so that counters and histograms have series too.
    with Client(api_url, new_key(10)) as client:
        client.wait(client.submit(prompt="lint", tier="budget", steps=1).id)
    token = env.get("SDQ_METRICS_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{api_url}/metrics", headers=headers)
    assert response.status_code == 200
    result = subprocess.run(
        [tool, "check", "metrics"], input=response.text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    families = {f.name for f in text_string_to_metric_families(response.text)}
    sdq = {name for name in families if name.startswith("sdq_")}
    declared = {n.removesuffix("_total") for n in COUNTERS} | set(GAUGES) | set(HISTOGRAMS)
    assert sdq == declared
