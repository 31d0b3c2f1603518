"""The job store on Redis: job records, compare-and-set transitions, an event log per job.

A job is a Redis hash whose fields are the JSON-encoded top-level fields of ``Job``. Every
change of status goes through one Lua script, so the check of the current status, the write,
the refund, the event log entry and the notification happen atomically: terminal states are
final and a refund is paid at most once, whatever races between workers, API and retries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

import redis

from common.errors import Conflict, InsufficientCredits, NotFound
from common.job import TERMINAL, ImageResult, Job, JobStatus, now
from common.keys import apikey_key

log = logging.getLogger(__name__)

# Debit the key and write the job in one step: no job without its charge, no charge without
# its job. Returns {1, credits_left} or {0, credits} when the key cannot pay.
_CREATE = """
local credits = redis.call('HGET', KEYS[1], 'credits')
if not credits then return {-1, 0} end
credits = tonumber(credits)
local cost = tonumber(ARGV[1])
if credits < cost then return {0, credits} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {-2, credits} end
local left = redis.call('HINCRBY', KEYS[1], 'credits', -cost)
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
redis.call('RPUSH', KEYS[4], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[4])
return {1, left}
"""

# Compare-and-set a job's status. ARGV: to, ttl, refund, count attempt, event, channel,
# n, n allowed current statuses, then field/value pairs. Returns {1, attempts, credits}
# on success (credits -1 when nothing was refunded), {0, current} when refused, {-1} when
# the job does not exist.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1} end
local n = tonumber(ARGV[7])
local allowed = false
for i = 8, 7 + n do
  if ARGV[i] == cur then allowed = true end
end
if not allowed then return {0, cur} end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 8 + n, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if ARGV[4] == '1' then
  attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
end
local credits = -1
if ARGV[3] == '1' and redis.call('HGET', KEYS[1], 'refunded') ~= 'true' then
  local cost = tonumber(redis.call('HGET', KEYS[1], 'cost') or '0')
  if cost > 0 and redis.call('EXISTS', KEYS[3]) == 1 then
    credits = redis.call('HINCRBY', KEYS[3], 'credits', cost)
  end
  redis.call('HSET', KEYS[1], 'refunded', 'true')
end
redis.call('RPUSH', KEYS[2], ARGV[5])
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
redis.call('PUBLISH', ARGV[6], ARGV[5])
return {1, attempts, credits}
"""

EVENT_TYPES = {
    JobStatus.QUEUED: "job.queued",
    JobStatus.RUNNING: "job.started",
    JobStatus.SUCCEEDED: "job.succeeded",
    JobStatus.FAILED: "job.failed",
    JobStatus.CANCELED: "job.canceled",
}


def job_key(job_id: str) -> str:
    return f"sdq:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"sdq:job:{job_id}:events"


def events_channel(job_id: str) -> str:
    """The pub/sub channel on which every event of a job is published as it is logged."""
    return f"sdq:events:{job_id}"


def key_jobs_key(key_id: str) -> str:
    return f"sdq:apikey:{key_id}:jobs"


def _encode(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, json.dumps(value)]
    return flat


def _event(status: JobStatus, **extra: Any) -> str:
    return json.dumps({"type": EVENT_TYPES[status], "status": status.value, "at": now(), **extra})


class Transition:
    """The outcome of a compare-and-set: whether it applied and what it changed."""

    def __init__(self, applied: bool, current: JobStatus, attempts: int = 0, credits: int = -1):
        self.applied = applied
        self.current = current
        self.attempts = attempts
        #: The key's credits after a refund made by this transition, or -1 when none was.
        self.credits = credits


class JobStore:
    """Job records, state transitions and event logs on a Redis-compatible server."""

    def __init__(self, client: redis.Redis, *, finished_ttl: int = 7 * 86400) -> None:
        self.redis = client
        self.finished_ttl = finished_ttl
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)

    def create(self, job: Job) -> int:
        """Debit the job's cost from its key and store it as queued; returns credits left."""
        fields = job.model_dump(mode="json")
        event = _event(JobStatus.QUEUED, job_id=job.id)
        code, credits = self._create(
            keys=[
                apikey_key(job.key_id),
                job_key(job.id),
                key_jobs_key(job.key_id),
                events_key(job.id),
            ],
            args=[
                job.cost,
                job.created_at,
                job.id,
                event,
                events_channel(job.id),
                *_encode(fields),
            ],
        )
        if code == -1:
            raise NotFound(f"no API key {job.key_id}")
        if code == 0:
            raise InsufficientCredits(
                f"not enough credits: this job costs {job.cost}, the key has {credits}"
            )
        if code == -2:
            raise Conflict(f"job {job.id} already exists")
        log.info("job %s queued on tier %s, cost %d", job.id, job.tier, job.cost)
        return int(credits)

    def get(self, job_id: str) -> Job:
        data = self.redis.hgetall(job_key(job_id))
        if not data:
            raise NotFound(f"no job {job_id}")
        return Job.model_validate({name: json.loads(value) for name, value in data.items()})

    def transition(
        self,
        job: Job,
        to: JobStatus,
        *,
        allowed_from: Iterable[JobStatus],
        fields: dict[str, Any] | None = None,
        refund: bool = False,
        count_attempt: bool = False,
        **event: Any,
    ) -> Transition:
        """Move ``job`` to ``to`` if its current status is one of ``allowed_from``."""
        allowed = [json.dumps(s.value) for s in allowed_from]
        ttl = self.finished_ttl if to in TERMINAL else 0
        result = self._transition(
            keys=[job_key(job.id), events_key(job.id), apikey_key(job.key_id)],
            args=[
                json.dumps(to.value),
                ttl,
                int(refund),
                int(count_attempt),
                _event(to, job_id=job.id, **event),
                events_channel(job.id),
                len(allowed),
                *allowed,
                *_encode(fields or {}),
            ],
        )
        if result[0] == -1:
            raise NotFound(f"no job {job.id}")
        if result[0] == 0:
            current = JobStatus(json.loads(result[1]))
            log.info("job %s: refused %s -> %s", job.id, current.value, to.value)
            return Transition(False, current)
        log.info("job %s -> %s", job.id, to.value)
        return Transition(True, to, attempts=int(result[1]), credits=int(result[2]))

    def start(self, job: Job) -> Transition:
        """``queued -> running``; a redelivered running job counts one more attempt."""
        return self.transition(
            job,
            JobStatus.RUNNING,
            allowed_from=[JobStatus.QUEUED, JobStatus.RUNNING],
            fields={"started_at": now()},
            count_attempt=True,
        )

    def succeed(
        self, job: Job, images: list[ImageResult], *, backend: str, model: str
    ) -> Transition:
        return self.transition(
            job,
            JobStatus.SUCCEEDED,
            allowed_from=[JobStatus.RUNNING],
            fields={
                "finished_at": now(),
                "images": [image.model_dump(mode="json") for image in images],
                "backend": backend,
                "model": model,
            },
        )

    def fail(self, job: Job, error: str) -> Transition:
        """Fail a job that has not ended yet and refund its cost, once."""
        return self.transition(
            job,
            JobStatus.FAILED,
            allowed_from=[JobStatus.QUEUED, JobStatus.RUNNING],
            fields={"finished_at": now(), "error": error},
            refund=True,
            error=error,
        )

    def cancel(self, job: Job) -> Transition:
        return self.transition(
            job,
            JobStatus.CANCELED,
            allowed_from=[JobStatus.QUEUED, JobStatus.RUNNING],
            fields={"finished_at": now()},
            refund=True,
        )

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.redis.lrange(events_key(job_id), 0, -1)]
