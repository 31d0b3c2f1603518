"""The job store on Redis: job records, compare-and-set transitions, an event log per job.

A job is a Redis hash whose fields are the JSON-encoded top-level fields of ``Job``. Every
change goes through a Lua script, so the check of the current status, the write, the refund,
the event log entry, its notification and the webhook delivery it schedules happen in one
atomic step: terminal states are final, a refund is paid at most once, and no event is
logged without the webhook it owes (or the other way round).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio as aioredis

from common import lua
from common.errors import Conflict, Forbidden, InsufficientCredits, NotFound, RateLimited
from common.job import (
    EVENT_TYPES,
    PROGRESS,
    TERMINAL,
    ErrorCode,
    ImageResult,
    Job,
    JobStatus,
    now,
)
from common.records import DeliveryRecord
from common.redis_keys import (
    NO_BATCH_KEY,
    NO_IDEMPOTENCY_KEY,
    RUNNING_KEY,
    apikey_key,
    batch_key,
    events_key,
    fair_list_key,
    fair_ring_key,
    idempotency_key,
    job_key,
    key_jobs_key,
    taken_key,
)
from common.settings import Settings

log = logging.getLogger(__name__)


def delivery_id(job_id: str, event: str, step: int | None = None) -> str:
    """The ``webhook-id`` of one event of a job: stable across retries and redeliveries."""
    suffix = event.removeprefix("job.") + ("" if step is None else f"_{step}")
    return f"msg_{job_id.removeprefix('job_')}_{suffix}"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


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
    #: The store's clock when it applied: a worker measures waits by it, not by its own.
    clock: float | None = None
    #: Who holds the live lease that refused a start (``host:pid``).
    holder: str = ""


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


#: How many entries of jobs no longer queued one ``take`` may skip before it gives up.
_TAKE_SKIP = 100


def record_fields(job: Job) -> dict[str, str]:
    """A job as its hash stores it: each top-level field as JSON text, plus ``webhook``
    (its URL and events) so the Lua steps never parse the request."""
    fields = {name: json.dumps(value) for name, value in job.model_dump(mode="json").items()}
    request = job.request
    if request.webhook_url is not None and request.webhook_events:
        fields["webhook"] = json.dumps(
            {"url": request.webhook_url, "events": request.webhook_events}
        )
    return fields


def webhook_body(client: redis.Redis, record: DeliveryRecord) -> str | None:
    """The body of a webhook delivery, built when it is sent: the event as it was logged
    (or the step, for progress) and the job's request from its one stored copy. ``None``
    when the job's record has expired."""
    job_id = record.job_id
    with client.pipeline(transaction=False) as pipe:
        pipe.hget(job_key(job_id), "request")
        if record.seq is not None:
            pipe.lindex(events_key(job_id), record.seq - 1)
        rows = pipe.execute()
    if rows[0] is None:
        return None
    if record.seq is not None:
        if rows[1] is None:
            return None
        logged = json.loads(rows[1])
        data = logged["data"]
    else:
        data = {"id": job_id, "status": "running", "progress": json.loads(record.progress or "{}")}
    data["request"] = json.loads(rows[0])
    body = {"type": record.event, "timestamp": record.timestamp, "data": data}
    return json.dumps(body, separators=(",", ":"))


class JobStore:
    """Job records, state transitions and event logs on a Redis-compatible server."""

    @classmethod
    def from_settings(
        cls, settings: Settings, client: redis.Redis, aio: aioredis.Redis | None = None
    ) -> JobStore:
        """The store with every TTL and limit from ``settings``: the one place they meet."""
        return cls(
            client,
            finished_ttl=settings.job_ttl_seconds,
            idempotency_ttl=settings.idempotency_ttl_seconds,
            delivery_ttl=settings.delivery_ttl_seconds,
            max_jobs=settings.default_max_jobs,
            lease_seconds=settings.lease_seconds,
            stuck_ttl=settings.stuck_ttl_seconds,
            aio=aio,
        )

    def __init__(
        self,
        client: redis.Redis,
        *,
        finished_ttl: int = 7 * 86400,
        idempotency_ttl: int = 86400,
        delivery_ttl: int = 9 * 86400,
        max_jobs: int = 1000,
        lease_seconds: float = 30.0,
        stuck_ttl: int = 30 * 86400,
        aio: aioredis.Redis | None = None,
    ) -> None:
        self.redis = client
        self.finished_ttl = finished_ttl
        self.idempotency_ttl = idempotency_ttl
        self.delivery_ttl = delivery_ttl
        #: A key's cap of jobs queued or running, unless the key has its own.
        self.max_jobs = max_jobs
        self.lease_seconds = lease_seconds
        self.stuck_ttl = stuck_ttl
        self._heartbeat = client.register_script(lua.source("heartbeat"))
        self._requeue = client.register_script(lua.source("requeue"))
        self._create = client.register_script(lua.source("create"))
        self._transition = client.register_script(lua.source("transition"))
        self._progress = client.register_script(lua.source("progress"))
        self._take = client.register_script(lua.source("take"))
        self._take_more = client.register_script(lua.source("take_more"))
        self._delete = client.register_script(lua.source("job_delete"))
        self._acreate = aio.register_script(lua.source("create")) if aio is not None else None

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
        return self._created(jobs, idempotency, self._create(keys=keys, args=args))

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
        return self._created(jobs, idempotency, await self._acreate(keys=keys, args=args))

    def _create_call(
        self,
        jobs: Sequence[Job],
        idempotency: tuple[str, str] | None,
        batch: dict[str, Any] | None,
        messages: Sequence[tuple[str, str]] | None,
    ) -> tuple[list[str], list[Any]]:
        key_id = jobs[0].key_id
        token, digest = idempotency or ("", "")
        plan: dict[str, Any] = {
            "cost": sum(job.cost for job in jobs),
            "digest": digest,
            "idempotency_ttl": self.idempotency_ttl,
            "timestamp": iso(jobs[0].created_at),
            "now": now(),
            "delivery_ttl": self.delivery_ttl,
            "stuck_ttl": self.stuck_ttl,
            "batch": json.dumps(batch) if batch else "",
            "max_jobs": self.max_jobs,
            "jobs": [],
        }
        for job, (queue, message) in zip(jobs, messages or [("", "")] * len(jobs), strict=True):
            plan["jobs"].append(
                {
                    "id": job.id,
                    "created_at": job.created_at,
                    "tier": job.tier,
                    "lane": job.lane or job.tier,
                    "priority": job.priority,
                    "cost": job.cost,
                    "fields": record_fields(job),
                    "queued_delivery": delivery_id(job.id, EVENT_TYPES[JobStatus.QUEUED]),
                    "list": queue,
                    "message": message,
                }
            )
        keys = [
            apikey_key(key_id),
            key_jobs_key(key_id),
            idempotency_key(key_id, token) if token else NO_IDEMPOTENCY_KEY,
            batch_key(batch["id"]) if batch else NO_BATCH_KEY,
        ]
        # The request was validated as UTF-8 text (common.job), so Lua decodes it safely.
        return keys, [json.dumps(plan, ensure_ascii=False)]

    @staticmethod
    def _created(
        jobs: Sequence[Job], idempotency: tuple[str, str] | None, result: list[Any]
    ) -> Created:
        code, value = result[0], result[1]
        if code == -1:
            raise NotFound(f"no API key {jobs[0].key_id}")
        if code == -2:
            raise Forbidden("this API key was revoked")
        if code == -4:
            raise Forbidden("this API key is disabled")
        if code == 0:
            cost = sum(job.cost for job in jobs)
            raise InsufficientCredits(
                f"not enough credits: this request costs {cost}, the key has {value}"
            )
        if code == 3:
            cap = int(result[2])
            raise RateLimited(
                f"too many jobs at once: this key has {value} queued or running, its cap is "
                f"{cap}, and this request adds {len(jobs)}; retry when some have ended",
                retry_after=5.0,
                active=int(value),
                max_jobs=cap,
            )
        if code == 2:
            seen_digest, _, ids = str(value).partition(" ")
            if idempotency is None or seen_digest != idempotency[1]:
                raise Conflict(
                    "this Idempotency-Key was already used with a different request; "
                    "use a new key for a new request"
                )
            return Created(ids.split(","), None, replayed=True)
        for index, job in enumerate(jobs):
            job.created_at = float(result[2]) + index / 1e6  # the store's clock, as recorded
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
        """A key's jobs, newest first, from the index of ``status`` (or of all); returns a
        page and the offset of the next one."""
        index = key_jobs_key(key_id, status)
        found: list[Job] = []
        position = offset
        while len(found) < limit:
            want = limit - len(found)
            ids = [str(i) for i in self.redis.zrevrange(index, position, position + want - 1)]
            if not ids:
                return found, None
            expired = []
            for job_id, job in zip(ids, self.get_many(ids), strict=True):
                if job is None:
                    expired.append(job_id)
                else:
                    found.append(job)
                    position += 1
            if expired:
                self.redis.zrem(index, *expired)  # their records expired: forget them
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
        expired_only: bool = False,
        holder: str = "",
        takeover_from: str = "",
    ) -> Transition:
        """Move ``job`` (a job, or only its id when nothing is refunded) to ``to`` if its
        current status is one of ``allowed_from``. ``delivery``: a worker received the job's
        message; count an attempt, take the job's lease and return the job as it now is
        (refused while another run's lease is live). ``expired_only``: refuse a running job
        whose lease is live."""
        job_id = job if isinstance(job, str) else job.id
        event = EVENT_TYPES[to]
        moment = now()
        args = {
            "to": to.value,
            "allowed": [status.value for status in allowed_from],
            "terminal": to in TERMINAL,
            "ttl": self.finished_ttl if to in TERMINAL else 0,
            "refund": refund,
            "delivery": delivery,
            "lease": self.lease_seconds,
            "holder": holder,
            "takeover_from": takeover_from,
            "expired_only": expired_only,
            "event": event,
            "timestamp": iso(moment),
            "delivery_id": delivery_id(job_id, event),
            "now": moment,
            "delivery_ttl": self.delivery_ttl,
            "fields": {name: json.dumps(value) for name, value in (fields or {}).items()},
        }
        result = self._transition(keys=[job_key(job_id)], args=[json.dumps(args)])
        if result[0] == -1:
            raise NotFound(f"no job {job_id}")
        if result[0] == 0:
            current = JobStatus(result[1])
            log.info("job %s: refused %s -> %s", job_id, current.value, to.value)
            return Transition(False, current, holder=str(result[2]) if len(result) > 2 else "")
        log.info("job %s -> %s", job_id, to.value)
        flat = result[3] if delivery else []
        return Transition(
            True,
            to,
            attempts=int(result[1]),
            credits=-1 if result[2] is None else int(result[2]),
            job=_job(dict(zip(flat[::2], flat[1::2], strict=True))) if flat else None,
            clock=float(result[4]),
        )

    def heartbeat(self, job_id: str, attempt: int) -> JobStatus | None:
        """Renew the lease of run ``attempt`` of a job; ``None`` when that run no longer
        holds it (the job ended or was canceled, or another worker took it over)."""
        status = self._heartbeat(keys=[job_key(job_id)], args=[self.lease_seconds, attempt])
        return JobStatus(json.loads(status)) if status else None

    def expired_leases(self, limit: int = 100) -> list[str]:
        """Running jobs whose lease ran out by the store's clock: their workers are gone."""
        seconds, micros = self.redis.time()
        ids = self.redis.zrangebyscore(
            RUNNING_KEY, "-inf", seconds + micros / 1e6, start=0, num=limit
        )
        return [str(i) for i in ids]

    def requeue(self, job_id: str, message: tuple[str, str] = ("", "")) -> bool:
        """Queue a running job whose lease ran out again, at the front of its key's turn,
        pushing ``message`` (broker list, payload) in the same step; False when its lease
        is live or it is not running."""
        queue, payload = message
        return bool(self._requeue(keys=[job_key(job_id)], args=[queue, payload]))

    def take(self, job_id: str, task_id: str) -> str | None:
        """The job a task message sent for ``job_id`` runs: the next of its tier and
        priority in turn by key, or the one it took before when the message is redelivered.
        ``None`` when no job is waiting (the one it was sent for was canceled or taken)."""
        taken = self._take(keys=[taken_key(task_id)], args=[job_id, self.finished_ttl, _TAKE_SKIP])
        return str(taken) if taken else None

    def waiting(self, lane: str, priority: int, limit: int) -> list[str]:
        """Up to ``limit`` ids of the jobs waiting in ``lane`` at ``priority``, in the order
        the messages would take them (round robin by key); some may have ended since."""
        ring = fair_ring_key(lane, str(priority))
        key_ids = self.redis.lrange(ring, 0, limit - 1)
        with self.redis.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.lrange(fair_list_key(lane, str(priority), str(key_id)), 0, limit - 1)
            lists = pipe.execute()
        in_turn = [str(id) for row in itertools.zip_longest(*lists) for id in row if id]
        return list(dict.fromkeys(in_turn))[:limit]

    def take_more(self, job_ids: Sequence[str]) -> int:
        """Take jobs started to run in one call with another out of their keys' turns (a
        message taking the next job then skips no entry for them); returns how many
        entries went."""
        if not job_ids:
            return 0
        return int(self._take_more(keys=[], args=list(job_ids)))

    def start(self, job_id: str, holder: str = "", takeover_from: str = "") -> Transition:
        """``queued -> running`` when a worker receives the job's message, taking its lease
        as ``holder``; a redelivered running job whose lease ran out (or whose holder is
        ``takeover_from``, known dead) counts one more attempt. The transition carries the
        job as it now is: the worker reads and starts it in one round trip."""
        return self.transition(
            job_id,
            JobStatus.RUNNING,
            allowed_from=[JobStatus.QUEUED, JobStatus.RUNNING],
            delivery=True,
            holder=holder,
            takeover_from=takeover_from,
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
                "images": [image.model_dump(mode="json") for image in images],
                "backend": backend,
                "model": model,
                "remote_reason": remote_reason,
            },
        )

    def fail(
        self,
        job: Job,
        error: str,
        *,
        code: ErrorCode = ErrorCode.GENERATION_FAILED,
        expired_only: bool = False,
    ) -> Transition:
        """Fail a job that has not ended yet and refund its cost, once; ``error`` is what its
        owner reads (plain words, no internals), ``code`` the stable reason. ``expired_only``:
        not while a run holds a live lease on it."""
        return self.transition(
            job,
            JobStatus.FAILED,
            allowed_from=[JobStatus.QUEUED, JobStatus.RUNNING],
            fields={"error": error, "error_code": code.value},
            refund=True,
            expired_only=expired_only,
        )

    def cancel(self, job: Job) -> Transition:
        """Cancel a queued or running job and refund it, once. A running job stops at the
        denoising step after the worker's ``progress`` call sees the new status."""
        return self.transition(
            job,
            JobStatus.CANCELED,
            allowed_from=[JobStatus.QUEUED, JobStatus.RUNNING],
            refund=True,
        )

    def progress(self, job: Job, steps: Sequence[tuple[int, int, float]]) -> JobStatus | None:
        """Record denoising steps ``(step, total, time)`` in one round trip, each its own
        ``job.progress`` event; returns the job's status (``None`` if it expired)."""
        args: list[Any] = [self.delivery_ttl]
        for step, total, moment in steps:
            args += [
                json.dumps({"step": step, "total": total}),
                iso(moment),
                delivery_id(job.id, PROGRESS, step),
                moment,
            ]
        status = self._progress(keys=[job_key(job.id)], args=args)
        return JobStatus(json.loads(status)) if status else None

    def delete(self, job_id: str) -> JobStatus | None:
        """Delete an ended job's record, events and webhook deliveries, and send its objects
        to the sweeper (``common/retention.py``); ``None`` once deleted, else the status of a
        job that has not ended (nothing is deleted). ``NotFound`` when there is none."""
        result = self._delete(keys=[job_key(job_id)])
        if result[0] == -1:
            raise NotFound(f"no job {job_id}")
        if result[0] == 0:
            return JobStatus(result[1])
        log.info("job %s deleted", job_id)
        return None

    def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The logged events of a job, from sequence number ``after + 1`` on."""
        return [json.loads(item) for item in self.redis.lrange(events_key(job_id), after, -1)]
