"""Webhook delivery: Standard Webhooks signatures, retries from the store, a record of every
attempt.

Deliveries are scheduled by the job store's Lua scripts, atomically with the event they
report (``sdq:webhook:<id>`` plus a score in the ``sdq:webhooks:due`` sorted set). A
dispatcher claims due deliveries, sends them and records the outcome. Long retry delays wait
in that sorted set, never as ETA tasks in the broker (Redis would redeliver those after the
visibility timeout). Delivery never fails a job: it is its own step with its own record.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal, cast

import httpx
import redis
from pydantic import BaseModel, Field
from standardwebhooks.webhooks import Webhook

from common.errors import NotFound
from common.keys import KeyStore
from common.metrics import Recorder
from common.netguard import Resolver, UnsafeUrl, check_url
from common.settings import Settings
from common.store import DUE_KEY, WAKE_KEY, attempts_key, delivery_key, webhooks_key

log = logging.getLogger(__name__)

USER_AGENT = "sdq-webhooks/0.1"

# Claim due deliveries by pushing their score past a lease: a dispatcher that dies
# mid-send leaves them to be claimed again when the lease ends.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], id) end
return due
"""

DeliveryState = Literal["pending", "delivered", "failed", "gone"]


class Attempt(BaseModel):
    at: float
    status_code: int | None = None
    error: str | None = None
    duration_ms: int


class Delivery(BaseModel):
    """One event owed to a job's webhook URL, and how its attempts went."""

    id: str = Field(description="The webhook-id header: stable across retries.")
    event: str
    url: str
    state: DeliveryState
    attempts: int
    first_at: float
    next_at: float | None = None
    last_status: int | None = None
    last_error: str | None = None
    history: list[Attempt] = Field(default_factory=list)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with +-25% jitter: attempt 1 waits about ``base``."""
    return float(min(cap, base * 2.0 ** (attempt - 1)) * random.uniform(0.75, 1.25))


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def sign(secret: str, webhook_id: str, timestamp: datetime, body: str) -> dict[str, str]:
    """The Standard Webhooks headers for ``body``."""
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, timestamp, body),
    }


class Deliveries:
    """Reads and reschedules a job's deliveries (the API side)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def for_job(self, job_id: str) -> list[Delivery]:
        ids = cast(list[str], self.redis.lrange(webhooks_key(job_id), 0, -1))
        with self.redis.pipeline(transaction=False) as pipe:
            for delivery_id in ids:
                pipe.hgetall(delivery_key(delivery_id))
                pipe.lrange(attempts_key(delivery_id), 0, -1)
            rows = pipe.execute()
        deliveries = []
        for record, history in zip(rows[::2], rows[1::2], strict=True):
            if record:
                deliveries.append(_delivery(record, history))
        return deliveries

    def redeliver(self, job_id: str) -> list[str]:
        """Send every event of a job once more, with its original webhook-id."""
        ids = cast(list[str], self.redis.lrange(webhooks_key(job_id), 0, -1))
        moment = time.time()
        with self.redis.pipeline() as pipe:
            for delivery_id in ids:
                pipe.hset(
                    delivery_key(delivery_id),
                    mapping={"state": "pending", "first_at": moment, "next_at": moment},
                )
                pipe.zadd(DUE_KEY, {delivery_id: moment})
            pipe.lpush(WAKE_KEY, "redeliver")
            pipe.ltrim(WAKE_KEY, 0, 99)
            pipe.execute()
        return ids


def _delivery(record: dict[str, str], history: list[str]) -> Delivery:
    return Delivery(
        id=record["id"],
        event=record["event"],
        url=record["url"],
        state=cast(DeliveryState, record["state"]),
        attempts=int(record["attempts"]),
        first_at=float(record["first_at"]),
        next_at=float(record["next_at"]) if record.get("next_at") else None,
        last_status=int(record["last_status"]) if record.get("last_status") else None,
        last_error=record.get("last_error") or None,
        history=[Attempt.model_validate_json(item) for item in history],
    )


class Dispatcher:
    """Claims due deliveries and sends them; run it with ``run(stop)`` in a thread."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        *,
        resolver: Resolver | None = None,
    ) -> None:
        self.redis = client
        self.settings = settings
        self.keys = KeyStore(client)
        self.resolver = resolver
        self._claim = client.register_script(_CLAIM)
        self.metrics = Recorder(client)
        self.http = httpx.Client(
            follow_redirects=False,
            timeout=settings.webhook_timeout_seconds,
            headers={"user-agent": USER_AGENT},
        )

    def claim(self, limit: int) -> list[str]:
        moment = time.time()
        lease = moment + self.settings.webhook_timeout_seconds + 30
        claimed: list[str] = self._claim(keys=[DUE_KEY], args=[moment, limit, lease])
        return claimed

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set."""
        workers = self.settings.webhook_concurrency
        with ThreadPoolExecutor(workers, thread_name_prefix="webhook") as pool:
            while not stop.is_set():
                try:
                    claimed = self.claim(workers * 2)
                    if claimed:
                        list(pool.map(self.deliver, claimed))
                        continue
                    self.redis.blpop([WAKE_KEY], timeout=self._idle_wait())
                except redis.RedisError as exc:
                    log.warning("webhook dispatcher: %s; retrying", exc)
                    stop.wait(1.0)
        self.http.close()

    def _idle_wait(self) -> float:
        head = self.redis.zrange(DUE_KEY, 0, 0, withscores=True)
        if not head:
            return 1.0
        due = float(cast(list[tuple[str, float]], head)[0][1])
        return min(1.0, max(0.05, due - time.time()))

    def deliver(self, delivery_id: str) -> DeliveryState | None:
        """Make one attempt at a delivery and record it; returns its new state."""
        try:
            return self._deliver(delivery_id)
        except Exception:
            log.exception("webhook %s: attempt failed unexpectedly", delivery_id)
            return None

    def _deliver(self, delivery_id: str) -> DeliveryState | None:
        record = cast(dict[str, str], self.redis.hgetall(delivery_key(delivery_id)))
        if not record or record.get("state") != "pending":
            self.redis.zrem(DUE_KEY, delivery_id)
            return None
        started = time.time()
        status_code: int | None = None
        error: str | None = None
        wait: float | None = None
        permanent = False
        try:
            target = check_url(
                record["url"],
                allow_loopback=self.settings.webhook_allow_loopback,
                resolver=self.resolver,
            )
            secret = self.keys.get(record["key_id"]).webhook_secret
            body = record["body"]
            headers = sign(secret, delivery_id, datetime.now(UTC), body)
            headers |= {"content-type": "application/json", "host": target.host_header()}
            # Connect to the address that was checked, whatever DNS says now.
            extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
            response = self.http.post(
                target.pinned_url(), content=body, headers=headers, extensions=extensions
            )
            status_code = response.status_code
            wait = retry_after(response.headers.get("retry-after"))
            if not response.is_success:
                error = f"HTTP {status_code}" + (
                    " (redirects are not followed)" if response.is_redirect else ""
                )
        except UnsafeUrl as exc:
            error, permanent = exc.message, True
        except NotFound:
            error, permanent = "the API key that owns this job no longer exists", True
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        attempt = Attempt(
            at=started,
            status_code=status_code,
            error=error,
            duration_ms=int((time.time() - started) * 1000),
        )
        return self._record(delivery_id, record, attempt, wait, permanent)

    def _record(
        self,
        delivery_id: str,
        record: dict[str, str],
        attempt: Attempt,
        wait: float | None,
        permanent: bool,
    ) -> DeliveryState:
        attempts = int(record["attempts"]) + 1
        next_at: float | None = None
        state: DeliveryState
        if attempt.status_code is not None and 200 <= attempt.status_code < 300:
            state = "delivered"
        elif attempt.status_code == 410:
            state = "gone"  # the receiver asked us to stop
        elif permanent:
            state = "failed"
        else:
            s = self.settings
            delay = backoff(attempts, s.webhook_retry_base_seconds, s.webhook_retry_max_seconds)
            delay = max(delay, wait or 0.0)
            deadline = float(record["first_at"]) + s.webhook_max_age_seconds
            if attempt.at + delay > deadline:
                state = "failed"
            else:
                state, next_at = "pending", attempt.at + delay
        fields: dict[str, Any] = {
            "state": state,
            "attempts": attempts,
            "next_at": next_at or "",
            "last_status": attempt.status_code or "",
            "last_error": attempt.error or "",
        }
        with self.redis.pipeline() as pipe:
            pipe.hset(delivery_key(delivery_id), items=[x for kv in fields.items() for x in kv])
            pipe.rpush(attempts_key(delivery_id), attempt.model_dump_json())
            pipe.expire(attempts_key(delivery_id), int(self.settings.webhook_max_age_seconds * 9))
            if next_at is not None:
                pipe.zadd(DUE_KEY, {delivery_id: next_at})
            else:
                pipe.zrem(DUE_KEY, delivery_id)
            pipe.execute()
        outcome = "retry" if state == "pending" else state
        self.metrics.inc("sdq_webhook_attempts_total", outcome=outcome)
        log.info(
            "webhook %s for job %s: attempt %d %s -> %s",
            delivery_id,
            record.get("job_id"),
            attempts,
            attempt.status_code or attempt.error,
            state,
        )
        return state
