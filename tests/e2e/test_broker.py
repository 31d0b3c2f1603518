"""Which broker carries the jobs: with SDQ_TEST_BROKER=amqp://..., RabbitMQ does."""

from __future__ import annotations

import os

import httpx
import pytest
from kombu import Connection

from common.settings import Settings
from common.tiers import load_tiers


def test_jobs_cross_the_configured_broker(api_url: str, new_key, settings: Settings) -> None:
    url = os.environ.get("SDQ_TEST_BROKER")
    if not url:
        pytest.skip("SDQ_TEST_BROKER is not set: the broker is the job store's Valkey")
    response = httpx.post(
        f"{api_url}/stable-diffusion-budget",
        headers={"Authorization": new_key()},
        files={"inputText": (None, "through rabbit"), "steps": (None, "1")},
        timeout=60,
    )
    assert response.status_code == 200
    assert settings.effective_broker_url == url
    queue = load_tiers(settings.tiers_file).get("budget").queue
    with Connection(url) as conn:
        declared = conn.channel().queue_declare(queue, passive=True)
    assert declared.queue == queue and declared.message_count == 0
    assert declared.consumer_count == 1
