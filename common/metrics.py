"""Fleet-wide Prometheus metrics, kept in Redis.

Jobs move between processes (API, worker children, the webhook dispatcher), so per-process
counters would need a scrape of every worker pod and a sum. Instead each process adds to
counters and histogram buckets in Redis (the job store's Lua scripts count the status
changes in the same atomic step), and the API's ``/metrics`` exposes them all through a
prometheus-client collector: one scrape sees the whole fleet. Hand-written because
prometheus-client's multiprocess mode shares a directory, not a network.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis.client import Pipeline

from common.redis_keys import METRICS_PREFIX, queued_key
from common.tiers import Tiers

log = logging.getLogger(__name__)

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

COUNTERS: dict[str, tuple[str, list[str]]] = {
    "sdq_jobs_total": ("Jobs that entered each status.", ["tier", "status"]),
    "sdq_credits_debited_total": ("Credits charged at submit.", ["tier"]),
    "sdq_credits_refunded_total": ("Credits refunded for failed or canceled jobs.", ["tier"]),
    "sdq_webhook_attempts_total": ("Webhook delivery attempts by outcome.", ["outcome"]),
    "sdq_reconciled_total": (
        "Jobs the reconciler fixed: requeued (lease ran out), failed (lost too often), "
        "enqueued (queued without a message).",
        ["action"],
    ),
    "sdq_remote_fallbacks_total": (
        "Jobs served by a tier's remote API, by reason.",
        ["tier", "reason"],
    ),
    "sdq_batched_jobs_total": (
        "Jobs that ran in one pipeline call with others (the tier's batch_images).",
        ["tier"],
    ),
}
GAUGES: dict[str, tuple[str, list[str]]] = {
    "sdq_queue_depth": ("Jobs waiting per tier and model.", ["tier", "model"]),
    "sdq_queue_oldest_age_seconds": (
        "Age of the oldest queued job per tier and model.",
        ["tier", "model"],
    ),
}
HISTOGRAMS: dict[str, tuple[str, list[str]]] = {
    "sdq_queue_wait_seconds": ("From submit to a worker starting the job.", ["tier"]),
    "sdq_generation_seconds": ("Pipeline or remote API time per job.", ["tier", "backend"]),
    "sdq_upload_seconds": ("Encoding and upload of a job's images.", ["tier"]),
    "sdq_job_duration_seconds": ("From submit to success, end to end.", ["tier", "backend"]),
}


def _field(labels: dict[str, str], part: str = "") -> str:
    return json.dumps(labels, sort_keys=True, separators=(",", ":")) + (f"|{part}" if part else "")


class Recorder:
    """What processes call to count and time things. A metric that cannot be written is
    logged and dropped: metrics never fail a job. One per thread: ``batch`` holds state."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._pipe: Pipeline | None = None

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        assert name in COUNTERS, name
        key = METRICS_PREFIX + name
        self._write(name, lambda pipe: pipe.hincrbyfloat(key, _field(labels), amount))

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        assert name in HISTOGRAMS, name
        bucket = next((b for b in BUCKETS if seconds <= b), math.inf)
        key = METRICS_PREFIX + name

        def add(pipe: Pipeline) -> None:
            pipe.hincrby(key, _field(labels, str(bucket)), 1)
            pipe.hincrbyfloat(key, _field(labels, "sum"), seconds)
            pipe.hincrby(key, _field(labels, "count"), 1)

        self._write(name, add)

    @contextmanager
    def batch(self) -> Iterator[Recorder]:
        """Metrics recorded inside go to Redis together, in one round trip at the end."""
        self._pipe = self.redis.pipeline(transaction=False)
        try:
            yield self
        finally:
            pipe, self._pipe = self._pipe, None
            try:
                pipe.execute()
            except redis.RedisError as exc:
                log.warning("metrics not recorded: %s", exc)

    def _write(self, name: str, add: Callable[[Pipeline], object]) -> None:
        if self._pipe is not None:
            add(self._pipe)
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                add(pipe)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("metric %s not recorded: %s", name, exc)


class FleetCollector(Collector):
    """Exposes the Redis-held metrics and the queues' state at scrape time."""

    def __init__(self, client: redis.Redis, tiers: Tiers) -> None:
        self.redis = client
        self.tiers = tiers

    def collect(self) -> Iterator[Metric]:
        now = cast(list[str], self.redis.time())
        moment = float(now[0]) + float(now[1]) / 1e6
        depth, oldest = (
            GaugeMetricFamily(name, GAUGES[name][0], labels=GAUGES[name][1])
            for name in ("sdq_queue_depth", "sdq_queue_oldest_age_seconds")
        )
        for tier, model, lane, _queue in self.tiers.lanes():
            key = queued_key(lane)
            depth.add_metric([tier.name, model], float(cast(int, self.redis.zcard(key))))
            head = cast(list[tuple[str, float]], self.redis.zrange(key, 0, 0, withscores=True))
            oldest.add_metric([tier.name, model], max(0.0, moment - head[0][1]) if head else 0.0)
        yield depth
        yield oldest
        for name, (doc, labels) in COUNTERS.items():
            family = CounterMetricFamily(name.removesuffix("_total"), doc, labels=labels)
            for field, value in self._hash(name).items():
                values = json.loads(field)
                family.add_metric([values.get(label, "") for label in labels], float(value))
            yield family
        for name, (doc, labels) in HISTOGRAMS.items():
            yield self._histogram(name, doc, labels)

    def _hash(self, name: str) -> dict[str, str]:
        return cast(dict[str, str], self.redis.hgetall(METRICS_PREFIX + name))

    def _histogram(self, name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=labels)
        series: dict[str, dict[str, float]] = defaultdict(dict)
        for field, value in self._hash(name).items():
            label_json, _, part = field.rpartition("|")
            series[label_json][part] = float(value)
        for label_json, parts in series.items():
            values: dict[str, Any] = json.loads(label_json)
            cumulative, buckets = 0.0, []
            for bound in (*BUCKETS, math.inf):
                cumulative += parts.get(str(bound), 0.0)
                buckets.append(("+Inf" if bound == math.inf else str(bound), cumulative))
            family.add_metric(
                [values.get(label, "") for label in labels], buckets, parts.get("sum", 0.0)
            )
        return family
