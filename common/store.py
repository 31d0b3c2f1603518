"""The job store on Redis: job records, compare-and-set transitions, an event log per job.

A job is a Redis hash whose fields are the JSON-encoded top-level fields of ``Job``. Every
change goes through a Lua script, so the check of the current status, the write, the refund,
the event log entry, its notification and the webhook delivery it schedules happen in one
atomic step: terminal states are final, a refund is paid at most once, and no event is
logged without the webhook it owes (or the other way round).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio as aioredis

from common.errors import Conflict, InsufficientCredits, NotFound
from common.job import EVENT_TYPES, PROGRESS, TERMINAL, ImageResult, Job, JobStatus, now
from common.keys import apikey_key

log = logging.getLogger(__name__)

DUE_KEY = "sdq:webhooks:due"
WAKE_KEY = "sdq:webhooks:wake"


def job_key(job_id: str) -> str:
    return f"sdq:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"sdq:job:{job_id}:events"


def webhooks_key(job_id: str) -> str:
    """The list of a job's webhook delivery ids."""
    return f"sdq:job:{job_id}:webhooks"


def delivery_key(delivery_id: str) -> str:
    return f"sdq:webhook:{delivery_id}"


def attempts_key(delivery_id: str) -> str:
    return f"sdq:webhook:{delivery_id}:attempts"


def events_channel(job_id: str) -> str:
    """The pub/sub channel on which every event of a job is published as it happens."""
    return f"sdq:events:{job_id}"


def key_jobs_key(key_id: str) -> str:
    return f"sdq:apikey:{key_id}:jobs"


def batch_key(batch_id: str) -> str:
    return f"sdq:batch:{batch_id}"


def idempotency_key(key_id: str, token: str) -> str:
    return f"sdq:idem:{key_id}:{hashlib.sha256(token.encode()).hexdigest()}"


def delivery_id(job_id: str, event: str, step: int | None = None) -> str:
    """The ``webhook-id`` of one event of a job: stable across retries and redeliveries."""
    suffix = event.removeprefix("job.") + ("" if step is None else f"_{step}")
    return f"msg_{job_id.removeprefix('job_')}_{suffix}"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


# Shared Lua: the job as JSON (its hash values are JSON already), and the event step that
# logs, publishes and, when the job asked for this event, schedules a webhook delivery.
_LUA_EVENT = """
local function tier_of(jobkey)
  return cjson.decode(redis.call('HGET', jobkey, 'tier'))
end

-- Fleet metrics (common/metrics.py): a hash per metric, a field per label set.
local function count(name, labels, amount)
  redis.call('HINCRBYFLOAT', 'sdq:metrics:' .. name, labels, amount)
end

local function snapshot(jobkey)
  local flat = redis.call('HGETALL', jobkey)
  local parts = {}
  for i = 1, #flat, 2 do
    if flat[i] ~= 'key_id' then parts[#parts + 1] = '"' .. flat[i] .. '":' .. flat[i + 1] end
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

-- Returns the logged event. `log` false: publish only (progress).
local function emit(jobkey, eventskey, channel, etype, ts, did, now, dttl, log)
  local body = '{"type":"' .. etype .. '","timestamp":"' .. ts .. '","data":'
    .. snapshot(jobkey) .. '}'
  local event = body
  if log then
    local seq = redis.call('RPUSH', eventskey, '')
    event = '{"seq":' .. seq .. ',' .. string.sub(body, 2)
    redis.call('LSET', eventskey, seq - 1, event)
  end
  redis.call('PUBLISH', channel, event)
  local req = cjson.decode(redis.call('HGET', jobkey, 'request'))
  local url = req['webhook_url']
  local wanted = req['webhook_events']
  if type(url) == 'string' and type(wanted) == 'table' then
    for _, name in ipairs(wanted) do
      if name == etype then
        local dkey = 'sdq:webhook:' .. did
        redis.call('HSET', dkey, 'id', did,
          'job_id', cjson.decode(redis.call('HGET', jobkey, 'id')),
          'key_id', cjson.decode(redis.call('HGET', jobkey, 'key_id')), 'event', etype,
          'url', url, 'body', body, 'state', 'pending', 'attempts', 0,
          'first_at', now, 'next_at', now)
        redis.call('EXPIRE', dkey, dttl)
        redis.call('RPUSH', jobkey .. ':webhooks', did)
        redis.call('ZADD', 'sdq:webhooks:due', now, did)
        redis.call('LPUSH', 'sdq:webhooks:wake', did)
        redis.call('LTRIM', 'sdq:webhooks:wake', 0, 99)
      end
    end
  end
  return event
end
"""

# Debit the key once for every job and write them all, or nothing. KEYS: the key's hash,
# its jobs index, the idempotency record, the batch record. ARGV: total cost, the request
# digest ('' without an Idempotency-Key), idempotency TTL, timestamp, now, delivery TTL,
# the batch's JSON ('' for none), n, then per job: id, created_at, fields as a JSON object,
# queued-event delivery id, and the broker list and task message to push ('' and '' when
# the caller publishes itself). Returns {1, credits_left}, {0, credits} when the key cannot
# pay, {2, record} when the Idempotency-Key was seen, {-1} for an unknown key.
_CREATE = (
    _LUA_EVENT
    + """
if ARGV[2] ~= '' then
  local seen = redis.call('GET', KEYS[3])
  if seen then return {2, seen} end
end
local credits = redis.call('HGET', KEYS[1], 'credits')
if not credits then return {-1, 0} end
credits = tonumber(credits)
local cost = tonumber(ARGV[1])
if credits < cost then return {0, credits} end
local left = redis.call('HINCRBY', KEYS[1], 'credits', -cost)
local n = tonumber(ARGV[8])
local ids = {}
for j = 0, n - 1 do
  local base = 9 + j * 6
  local id, fields = ARGV[base], cjson.decode(ARGV[base + 2])
  if ARGV[base + 4] ~= '' then redis.call('LPUSH', ARGV[base + 4], ARGV[base + 5]) end
  local jobkey = 'sdq:job:' .. id
  for name, value in pairs(fields) do redis.call('HSET', jobkey, name, value) end
  redis.call('ZADD', KEYS[2], ARGV[base + 1], id)
  local tier = tier_of(jobkey)
  redis.call('ZADD', 'sdq:queued:' .. tier, ARGV[base + 1], id)
  count('sdq_jobs_total', '{"status":"queued","tier":"' .. tier .. '"}', 1)
  count('sdq_credits_debited_total', '{"tier":"' .. tier .. '"}', tonumber(fields['cost']))
  emit(jobkey, jobkey .. ':events', 'sdq:events:' .. id, 'job.queued', ARGV[4], ARGV[base + 3],
       tonumber(ARGV[5]), tonumber(ARGV[6]), true)
  ids[#ids + 1] = id
end
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[4], ARGV[7], 'EX', tonumber(ARGV[6]))
end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[3], ARGV[2] .. ' ' .. table.concat(ids, ','), 'EX', tonumber(ARGV[3]))
end
return {1, left}
"""
)

# Compare-and-set a job's status. KEYS: job, events, key hash. ARGV: to, ttl, refund,
# delivery (count an attempt, return the job), event type, timestamp, channel, delivery id,
# now, delivery TTL, n, the n allowed current statuses, then field/value pairs. Returns
# {1, attempts, credits, job fields} (credits -1 when nothing was refunded; the job's hash,
# flat, for a delivery only), {0, current} when refused, {-1} when missing.
_TRANSITION = (
    _LUA_EVENT
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1} end
local n = tonumber(ARGV[11])
local allowed = false
for i = 12, 11 + n do
  if ARGV[i] == cur then allowed = true end
end
if not allowed then return {0, cur} end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
local tier = tier_of(KEYS[1])
redis.call('ZREM', 'sdq:queued:' .. tier, cjson.decode(redis.call('HGET', KEYS[1], 'id')))
count('sdq_jobs_total', '{"status":' .. ARGV[1] .. ',"tier":"' .. tier .. '"}', 1)
for i = 12 + n, #ARGV, 2 do
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
    count('sdq_credits_refunded_total', '{"tier":"' .. tier .. '"}', cost)
  end
  redis.call('HSET', KEYS[1], 'refunded', 'true')
end
emit(KEYS[1], KEYS[2], ARGV[7], ARGV[5], ARGV[6], ARGV[8],
     tonumber(ARGV[9]), tonumber(ARGV[10]), true)
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[1] .. ':webhooks', ttl)
end
if ARGV[4] == '1' then return {1, attempts, credits, redis.call('HGETALL', KEYS[1])} end
return {1, attempts, credits}
"""
)

# Record denoising steps of a running job, each its own event, and tell whoever listens.
# ARGV: channel, delivery TTL, then per step: progress, timestamp, delivery id, time.
# Returns the job's status, so the worker learns of a cancel in the same round trip.
_PROGRESS = (
    _LUA_EVENT
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return false end
if cur ~= '"running"' then return cur end
for i = 3, #ARGV, 4 do
  redis.call('HSET', KEYS[1], 'progress', ARGV[i])
  emit(KEYS[1], '', ARGV[1], 'job.progress', ARGV[i + 1], ARGV[i + 2],
       tonumber(ARGV[i + 3]), tonumber(ARGV[2]), false)
end
return cur
"""
)


@dataclass
class Transition:
    """The outcome of a compare-and-set: whether it applied and what it changed."""

    applied: bool
    current: JobStatus
    attempts: int = 0
    #: The key's credits after a refund made by this transition, or -1 when none was.
    credits: int = -1
    #: The job as the transition left it; read in the same step, by ``start`` only.
    job: Job | None = None


@dataclass
class Created:
    """Jobs written by ``create``: new ones, or those an earlier request with the same
    Idempotency-Key created (``replayed``)."""

    job_ids: list[str]
    credits: int | None
    replayed: bool = False


def _job(data: Mapping[Any, Any]) -> Job:
    """A job from its hash, whose values are JSON."""
    return Job.model_validate({name: json.loads(value) for name, value in data.items()})


def request_digest(payload: Any) -> str:
    """A digest of a request body, for Idempotency-Key comparisons."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class JobStore:
    """Job records, state transitions and event logs on a Redis-compatible server."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        finished_ttl: int = 7 * 86400,
        idempotency_ttl: int = 86400,
        delivery_ttl: int = 9 * 86400,
        aio: aioredis.Redis | None = None,
    ) -> None:
        self.redis = client
        self.finished_ttl = finished_ttl
        self.idempotency_ttl = idempotency_ttl
        self.delivery_ttl = delivery_ttl
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)
        self._progress = client.register_script(_PROGRESS)
        self._acreate = aio.register_script(_CREATE) if aio is not None else None

    def create(
        self,
        jobs: Sequence[Job],
        *,
        idempotency: tuple[str, str] | None = None,
        batch: dict[str, Any] | None = None,
        messages: Sequence[tuple[str, str]] | None = None,
    ) -> Created:
        """Debit the jobs' cost from their key and store them as queued, all or none.

        ``idempotency`` is ``(token, request digest)``: a token seen before returns the jobs
        it created, or raises ``Conflict`` when it came with another request. ``messages``,
        one ``(broker list, payload)`` per job, are pushed in the same atomic step, when the
        broker is this Redis (``common.transport.task_message``).
        """
        keys, args = self._create_call(jobs, idempotency, batch, messages)
        code, value = self._create(keys=keys, args=args)
        return self._created(jobs, idempotency, code, value)

    async def acreate(
        self,
        jobs: Sequence[Job],
        *,
        idempotency: tuple[str, str] | None = None,
        batch: dict[str, Any] | None = None,
        messages: Sequence[tuple[str, str]] | None = None,
    ) -> Created:
        """``create`` on the asyncio client given as ``aio``: no thread for the API's submit."""
        if self._acreate is None:
            raise RuntimeError("this JobStore was made without an asyncio client (aio=)")
        keys, args = self._create_call(jobs, idempotency, batch, messages)
        code, value = await self._acreate(keys=keys, args=args)
        return self._created(jobs, idempotency, code, value)

    def _create_call(
        self,
        jobs: Sequence[Job],
        idempotency: tuple[str, str] | None,
        batch: dict[str, Any] | None,
        messages: Sequence[tuple[str, str]] | None,
    ) -> tuple[list[str], list[Any]]:
        key_id = jobs[0].key_id
        token, digest = idempotency or ("", "")
        args: list[Any] = [
            sum(job.cost for job in jobs),
            digest,
            self.idempotency_ttl,
            iso(jobs[0].created_at),
            now(),
            self.delivery_ttl,
            json.dumps(batch) if batch else "",
            len(jobs),
        ]
        for job, message in zip(jobs, messages or [("", "")] * len(jobs), strict=True):
            fields = {
                name: json.dumps(value) for name, value in job.model_dump(mode="json").items()
            }
            queued = delivery_id(job.id, "job.queued")
            args += [job.id, job.created_at, json.dumps(fields), queued, *message]
        keys = [
            apikey_key(key_id),
            key_jobs_key(key_id),
            idempotency_key(key_id, token) if token else "sdq:idem:none",
            batch_key(batch["id"]) if batch else "sdq:batch:none",
        ]
        return keys, args

    @staticmethod
    def _created(
        jobs: Sequence[Job], idempotency: tuple[str, str] | None, code: int, value: Any
    ) -> Created:
        if code == -1:
            raise NotFound(f"no API key {jobs[0].key_id}")
        if code == 0:
            cost = sum(job.cost for job in jobs)
            raise InsufficientCredits(
                f"not enough credits: this request costs {cost}, the key has {value}"
            )
        if code == 2:
            seen_digest, _, ids = str(value).partition(" ")
            if idempotency is None or seen_digest != idempotency[1]:
                raise Conflict(
                    "this Idempotency-Key was already used with a different request; "
                    "use a new key for a new request"
                )
            return Created(ids.split(","), None, replayed=True)
        for job in jobs:
            log.info("job %s queued on tier %s, cost %d", job.id, job.tier, job.cost)
        return Created([job.id for job in jobs], int(value))

    def get(self, job_id: str) -> Job:
        data = self.redis.hgetall(job_key(job_id))
        if not data:
            raise NotFound(f"no job {job_id}")
        return _job(data)

    def get_many(self, job_ids: Iterable[str]) -> list[Job | None]:
        """Several jobs in one round trip; ``None`` for those that expired."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(job_key(job_id))
            rows = pipe.execute()
        return [_job(row) if row else None for row in rows]

    def statuses(self, job_ids: Sequence[str]) -> list[JobStatus | None]:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(job_key(job_id), "status")
            rows = pipe.execute()
        return [JobStatus(json.loads(row)) if row else None for row in rows]

    def list_for_key(
        self, key_id: str, *, limit: int, offset: int = 0, status: JobStatus | None = None
    ) -> tuple[list[Job], int | None]:
        """A key's jobs, newest first; returns a page and the offset of the next one."""
        index = key_jobs_key(key_id)
        found: list[Job] = []
        position = offset
        chunk = max(limit * 2, 50)
        while len(found) < limit:
            ids = [str(i) for i in self.redis.zrevrange(index, position, position + chunk - 1)]
            if not ids:
                return found, None
            for job_id, job in zip(ids, self.get_many(ids), strict=True):
                position += 1
                if job is None:
                    self.redis.zrem(index, job_id)  # expired: forget it
                    position -= 1
                    continue
                if status is None or job.status is status:
                    found.append(job)
                    if len(found) == limit:
                        break
        more = self.redis.zcard(index) > position
        return found, position if more else None

    def transition(
        self,
        job: Job | str,
        to: JobStatus,
        *,
        allowed_from: Iterable[JobStatus],
        fields: dict[str, Any] | None = None,
        refund: bool = False,
        delivery: bool = False,
    ) -> Transition:
        """Move ``job`` (a job, or only its id when nothing is refunded) to ``to`` if its
        current status is one of ``allowed_from``. ``delivery``: a worker received the job's
        message; count an attempt and return the job as it now is."""
        job_id = job if isinstance(job, str) else job.id
        # The key hash is touched only to refund, which needs the job's key.
        key_hash = apikey_key(job.key_id) if isinstance(job, Job) else "sdq:apikey:none"
        assert not refund or isinstance(job, Job), "a refund needs the job's key"
        allowed = [json.dumps(s.value) for s in allowed_from]
        event = EVENT_TYPES[to]
        ttl = self.finished_ttl if to in TERMINAL else 0
        flat: list[str] = []
        for name, value in (fields or {}).items():
            flat += [name, json.dumps(value)]
        moment = now()
        result = self._transition(
            keys=[job_key(job_id), events_key(job_id), key_hash],
            args=[
                json.dumps(to.value),
                ttl,
                int(refund),
                int(delivery),
                event,
                iso(moment),
                events_channel(job_id),
                delivery_id(job_id, event),
                moment,
                self.delivery_ttl,
                len(allowed),
                *allowed,
                *flat,
            ],
        )
        if result[0] == -1:
            raise NotFound(f"no job {job_id}")
        if result[0] == 0:
            current = JobStatus(json.loads(result[1]))
            log.info("job %s: refused %s -> %s", job_id, current.value, to.value)
            return Transition(False, current)
        log.info("job %s -> %s", job_id, to.value)
        flat = result[3] if delivery else []
        return Transition(
            True,
            to,
            attempts=int(result[1]),
            credits=int(result[2]),
            job=_job(dict(zip(flat[::2], flat[1::2], strict=True))) if flat else None,
        )

    def start(self, job_id: str) -> Transition:
        """``queued -> running`` when a worker receives the job's message; a redelivered
        running job counts one more attempt. The transition carries the job as it now is:
        the worker reads and starts it in one round trip."""
        return self.transition(
            job_id,
            JobStatus.RUNNING,
            allowed_from=[JobStatus.QUEUED, JobStatus.RUNNING],
            fields={"started_at": now()},
            delivery=True,
        )

    def succeed(
        self,
        job: Job,
        images: list[ImageResult],
        *,
        backend: str,
        model: str,
        remote_reason: str | None = None,
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
                "remote_reason": remote_reason,
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
        )

    def cancel(self, job: Job) -> Transition:
        """Cancel a queued or running job and refund it, once. A running job stops at the
        denoising step after the worker's ``progress`` call sees the new status."""
        return self.transition(
            job,
            JobStatus.CANCELED,
            allowed_from=[JobStatus.QUEUED, JobStatus.RUNNING],
            fields={"finished_at": now()},
            refund=True,
        )

    def progress(self, job: Job, steps: Sequence[tuple[int, int, float]]) -> JobStatus | None:
        """Record denoising steps ``(step, total, time)`` in one round trip, each its own
        ``job.progress`` event; returns the job's status (``None`` if it expired)."""
        args: list[Any] = [events_channel(job.id), self.delivery_ttl]
        for step, total, moment in steps:
            args += [
                json.dumps({"step": step, "total": total}),
                iso(moment),
                delivery_id(job.id, PROGRESS, step),
                moment,
            ]
        status = self._progress(keys=[job_key(job.id)], args=args)
        return JobStatus(json.loads(status)) if status else None

    def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The logged events of a job, from sequence number ``after + 1`` on."""
        return [json.loads(item) for item in self.redis.lrange(events_key(job_id), after, -1)]
