"""Metrics writes against a real Valkey: batched in one round trip, never raising."""

from __future__ import annotations

import redis

from common.metrics import Recorder
from common.redis_keys import METRICS_PREFIX as PREFIX


def test_a_batch_lands_at_its_end(rclient: redis.Redis) -> None:
    rclient.delete(PREFIX + "sdq_upload_seconds", PREFIX + "sdq_remote_fallbacks_total")
    recorder = Recorder(rclient)
    labels = '{"tier":"budget"}'
    with recorder.batch() as metrics:
        metrics.observe("sdq_upload_seconds", 0.2, tier="budget")
        metrics.inc("sdq_remote_fallbacks_total", tier="budget", reason="oom")
        assert not rclient.exists(PREFIX + "sdq_upload_seconds")  # nothing sent yet
    upload = rclient.hgetall(PREFIX + "sdq_upload_seconds")
    assert upload[f"{labels}|0.25"] == "1" and upload[f"{labels}|count"] == "1"
    assert float(upload[f"{labels}|sum"]) == 0.2
    fallbacks = rclient.hgetall(PREFIX + "sdq_remote_fallbacks_total")
    assert fallbacks == {'{"reason":"oom","tier":"budget"}': "1"}
    recorder.observe("sdq_upload_seconds", 3.0, tier="budget")  # unbatched: sent at once
    assert rclient.hget(PREFIX + "sdq_upload_seconds", f"{labels}|count") == "2"


def test_an_unreachable_redis_drops_metrics_without_raising() -> None:
    dead = redis.Redis(port=1, socket_connect_timeout=0.2)
    recorder = Recorder(dead)
    recorder.inc("sdq_jobs_total", tier="budget", status="queued")
    with recorder.batch() as metrics:
        metrics.observe("sdq_upload_seconds", 0.1, tier="budget")
