"""A scrape of /metrics after a few jobs: the series, their tier labels, counts that match."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from producer.client import Client
from tests.receiver import Receiver

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(api_url: str) -> Series:
    response = httpx.get(f"{api_url}/metrics")
    assert response.status_code == 200
    series: Series = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            series[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return series


def value(series: Series, name: str, **labels: str) -> float:
    return series.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_the_jobs_run(
    api_url: str, new_key: Callable[..., str], receiver: Receiver
) -> None:
    before = scrape(api_url)
    with Client(api_url, new_key(100)) as client:
        hook = receiver.url + "/metrics-hook"
        done = [
            client.submit(
                prompt=f"m{i}",
                tier="budget",
                steps=1,
                webhook_url=hook,
                webhook_events=["job.succeeded"],
            )
            for i in range(3)
        ]
        for job in done:
            client.wait(job.id)
        blocker = client.submit(prompt="slow", tier="normal", steps=50)
        waiting = client.submit(prompt="waits", tier="normal", steps=1)
        time.sleep(0.3)
        during = scrape(api_url)
        client.cancel(waiting.id)
        client.cancel(blocker.id)
        receiver.wait_for("/metrics-hook", 3)
        time.sleep(0.5)
    after = scrape(api_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sdq_jobs_total", tier="budget", status="queued") == 3
    assert delta("sdq_jobs_total", tier="budget", status="succeeded") == 3
    assert delta("sdq_jobs_total", tier="normal", status="canceled") == 2
    assert delta("sdq_credits_debited_total", tier="budget") == 3
    assert delta("sdq_credits_debited_total", tier="normal") == 4
    assert delta("sdq_credits_refunded_total", tier="normal") == 4
    for name in ("sdq_generation_seconds_count", "sdq_job_duration_seconds_count"):
        assert delta(name, tier="budget", backend="local") == 3
    assert delta("sdq_upload_seconds_count", tier="budget") == 3
    assert delta("sdq_queue_wait_seconds_count", tier="budget") == 3
    assert delta("sdq_webhook_attempts_total", outcome="delivered") >= 3
    assert (
        value(after, "sdq_job_duration_seconds_bucket", tier="budget", backend="local", le="+Inf")
        >= 3
    )
    assert value(during, "sdq_queue_depth", tier="normal", model="sdxl") >= 1
    assert value(during, "sdq_queue_oldest_age_seconds", tier="normal", model="sdxl") > 0
    assert ("sdq_queue_depth", (("model", "sdxl"), ("tier", "normal"))) in after
    assert value(after, "sdq_queue_depth", tier="normal", model="sdxl") == 0
    for tier in ("budget", "normal", "premium"):
        assert ("sdq_queue_depth", (("model", "sdxl"), ("tier", tier))) in after
