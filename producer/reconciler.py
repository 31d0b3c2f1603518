"""The reconciler: nothing stays queued without a message, or running without a worker.

One leader at a time (a lease in Redis), in every API process or as ``sdq reconcile``.
Each round it

- requeues running jobs whose lease ran out (their worker died) with a fresh message, so
  another worker takes them over now rather than after the broker's visibility timeout; a
  job that has lost its worker ``max_deliveries`` times ends failed, refunded;
- sends a message for every queued job that has none: a job sends one message, and any
  message runs the next job of its tier in turn (``take.lua``), so it compares the queued
  jobs of each tier with the messages waiting for it, and sends what a deficit seen in two
  rounds running says is missing (one round could catch a submit between its charge and
  its publish; a spare message only finds nothing to run).

- deletes the objects of jobs whose images are due (``common/retention.py``): a TTL after a
  success, at once after a failure, a cancel or a delete; in bounded batches, within half a
  round.

What it fixed is logged and counted in ``sdq_reconciled_total{action}``.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import Counter
from typing import Any, cast

import redis

from common import lua
from common.errors import NotFound
from common.job import ErrorCode, Job
from common.metrics import Recorder
from common.queue import is_amqp
from common.redis_keys import LEADER_KEY, RUNNING_KEY, queued_key, taken_key
from common.retention import Sweeper
from common.store import JobStore
from common.transport import PRIORITY_STEPS, queue_key
from producer.jobs import JobService

log = logging.getLogger(__name__)

#: kombu's Redis transport keeps delivered, unacked messages in this hash.
UNACKED_KEY = "unacked"
#: ... and the time each was delivered in this sorted set.
UNACKED_INDEX_KEY = "unacked_index"


class Reconciler:
    def __init__(self, jobs: JobService, metrics: Recorder | None = None) -> None:
        self.jobs = jobs
        self.store: JobStore = jobs.store
        self.redis: redis.Redis = jobs.store.redis
        self.settings = jobs.settings
        self.metrics = metrics or Recorder(self.redis)
        self.token = secrets.token_hex(8)
        self._lead = self.redis.register_script(lua.source("reconciler_lead"))
        #: Each tier's deficit of messages in the previous round.
        self._deficit: dict[str, int] = {}
        storage = jobs.storage
        self.sweeper = None if storage is None else Sweeper(self.redis, storage, self.settings)

    def lead(self) -> bool:
        """Whether this process leads for the next few rounds."""
        ttl = int(self.settings.reconcile_interval_seconds * 3 * 1000)
        return bool(self._lead(keys=[LEADER_KEY], args=[self.token, ttl]))

    def run(self, stop: threading.Event) -> None:
        """Reconcile every interval while leading, until ``stop`` is set."""
        while not stop.wait(self.settings.reconcile_interval_seconds):
            try:
                if self.lead():
                    self.once()
            except redis.RedisError as exc:
                log.warning(
                    "reconciler: %s; next round in %.0fs",
                    exc,
                    self.settings.reconcile_interval_seconds,
                )
            except Exception:
                log.exception("reconciler: the round failed")

    def once(self) -> Counter[str]:
        """One round; returns what it did, by action."""
        done: Counter[str] = Counter()
        for job_id in self.store.expired_leases():
            try:
                done[self._take_over(job_id)] += 1
            except redis.RedisError:
                raise
            except Exception:
                log.exception("reconciler: job %s could not be taken over", job_id)
        for _tier, _model, lane, queue in self.jobs.tiers.lanes():
            done["enqueued"] += self._fill(lane, queue)
        if self.sweeper is not None:
            done["swept"] += self.sweeper.sweep(self.settings.reconcile_interval_seconds / 2)
        done.pop("", None)
        for action, count in done.items():
            if count:
                self.metrics.inc("sdq_reconciled_total", count, action=action)
                log.info("reconciler: %s %d job(s)", action, count)
        return done

    def _take_over(self, job_id: str) -> str:
        try:
            job = self.store.get(job_id)
        except NotFound:
            self.redis.zrem(RUNNING_KEY, job_id)  # its record is gone
            return ""
        if job.tier not in self.jobs.tiers.names:
            return ""  # served by workers of another tiers file; theirs to settle
        if job.attempts >= self.settings.max_deliveries:
            message = f"gave up after {job.attempts} deliveries: the worker was lost each time"
            if self.store.fail(job, message, code=ErrorCode.LOST, expired_only=True).applied:
                log.error("job %s: %s", job.id, message)
                return "failed"
            return ""
        in_store = self.jobs.enqueue_in_store
        if not self.store.requeue(
            job.id, self.jobs.message(job, resend=True) if in_store else ("", "")
        ):
            return ""
        if not in_store:
            self._publish(job)
        log.warning("job %s: its worker's lease ran out; requeued", job.id)
        return "requeued"

    def _fill(self, lane: str, queue: str) -> int:
        """Send the messages ``lane`` (a tier, or a tier's model) lacks; returns how many were
        sent."""
        queued = int(self.redis.zcard(queued_key(lane)))
        deficit = queued - self._messages(queue) if queued else 0
        missing = min(deficit, self._deficit.get(lane, 0))
        self._deficit[lane] = deficit
        if missing <= 0:
            return 0
        # The newest queued jobs: the oldest are the likeliest to have theirs in flight.
        ids = [str(i) for i in self.redis.zrevrange(queued_key(lane), 0, missing - 1)]
        sent = 0
        for job in self.store.get_many(ids):
            if job is None:
                continue
            if self.jobs.enqueue_in_store:
                queue_list, payload = self.jobs.message(job, resend=True)
                self.redis.lpush(queue_list, payload)
            elif not self._publish(job):
                break
            sent += 1
        self._deficit[lane] = 0  # counted afresh next round, with these sent
        return sent

    def _messages(self, queue: str) -> int:
        """Messages waiting for ``queue``: not yet delivered, or delivered to a worker that
        has not yet taken a job with it."""
        if is_amqp(self.settings.effective_broker_url):
            with self.jobs.celery.connection_for_write() as conn:
                return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
        with self.redis.pipeline(transaction=False) as pipe:
            for priority in PRIORITY_STEPS:
                pipe.llen(queue_key(queue, priority))
            waiting = sum(int(n) for n in pipe.execute())
        # A delivered message not yet used to take a job counts while it is young: a live
        # worker takes its job within moments, but one killed in between leaves its message
        # in `unacked` until the visibility timeout, an hour.
        fresh_after = time.time() - self.settings.lease_seconds
        delivered = []
        for tag, raw in cast(dict[str, str], self.redis.hgetall(UNACKED_KEY)).items():
            payload, _exchange, routing_key = json.loads(raw)
            if routing_key == queue:
                delivered.append((tag, _task_id(payload)))
        if delivered:
            with self.redis.pipeline(transaction=False) as pipe:
                for tag, task_id in delivered:
                    pipe.exists(taken_key(task_id))
                    pipe.zscore(UNACKED_INDEX_KEY, tag)
                rows = pipe.execute()
            for taken, since in zip(rows[::2], rows[1::2], strict=True):
                if not taken and (since is None or float(since) > fresh_after):
                    waiting += 1
        return waiting

    def _publish(self, job: Job) -> bool:
        try:
            self.jobs.publish(job, resend=True)
        except Exception as exc:  # kombu raises several types when the broker is away
            log.warning("reconciler: job %s not sent (%s); next round", job.id, exc)
            return False
        return True


def _task_id(payload: dict[str, Any]) -> str:
    return str(payload.get("headers", {}).get("id", ""))
