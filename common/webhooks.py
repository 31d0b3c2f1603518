"""Webhook delivery: Standard Webhooks signatures, retries from the store, a record of every
attempt, and a dispatcher that no receiver can hurt.

Deliveries are scheduled by the job store's Lua scripts, atomically with the event they
report (``sdq:webhook:<id>`` plus a score in the ``sdq:webhooks:due`` sorted set); the body is
built at send time (``common.store.webhook_body``). A dispatcher claims due deliveries, sends
them and records the outcome. Long retry delays wait in that sorted set, never as ETA tasks in
the broker (Redis would redeliver those after the visibility timeout). Delivery never fails a
job: it is its own step with its own record.

A receiver gets one deadline (``webhook_timeout_seconds``) for DNS, connect, send and answer,
at most ``webhook_max_response_bytes`` of its answer are read, and at most
``webhook_per_host_concurrency`` sends go to one host at once. Every attempt is counted in the
store before it is sent, under a lease longer than the deadline, so a send that kills its
process still counts, and no other dispatcher sends the same delivery meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any, cast
from urllib.parse import urlsplit

import httpcore
import httpx
import redis
from pydantic import BaseModel, Field
from standardwebhooks.webhooks import Webhook

from common import lua
from common.apikeys import KeyStore
from common.errors import NotFound, RateLimited
from common.http import retry_after
from common.metrics import Recorder
from common.netguard import Resolver, Target, UnsafeUrl, check_url, system_resolver
from common.records import DeliveryRecord, DeliveryState
from common.redis import connect
from common.redis_keys import (
    DUE_KEY,
    WAKE_KEY,
    attempts_key,
    delivery_key,
    redeliver_key,
    webhooks_key,
)
from common.settings import Settings
from common.store import webhook_body

log = logging.getLogger(__name__)

USER_AGENT = "sdq-webhooks/0.1"
#: Attempts kept in ``sdq:webhook:<id>:attempts`` (the count in the record goes on).
HISTORY = 20


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


def sign(
    secrets: str | Sequence[str], webhook_id: str, timestamp: datetime, body: str
) -> dict[str, str]:
    """The Standard Webhooks headers for ``body``, signed with each of ``secrets``: during
    the overlap after a rotation, ``webhook-signature`` holds one ``v1,<sig>`` per secret,
    space-separated, and a receiver holding either secret verifies it."""
    if isinstance(secrets, str):
        secrets = [secrets]
    signatures = " ".join(Webhook(secret).sign(webhook_id, timestamp, body) for secret in secrets)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signatures,
    }


class Deliveries:
    """Reads and reschedules a job's deliveries (the API side)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._redeliver = client.register_script(lua.source("webhook_redeliver"))

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
        """Send every event of a job once more, with its original webhook-id: one attempt now,
        and retries only within the original retry window (``first_at`` is kept). At most once
        per ``webhook_redeliver_interval_seconds`` a job, else ``RateLimited``."""
        interval = self.settings.webhook_redeliver_interval_seconds
        if interval > 0:
            key = redeliver_key(job_id)
            if not self.redis.set(key, "1", nx=True, px=max(1, int(interval * 1000))):
                left = max(1, cast(int, self.redis.pttl(key))) / 1000
                raise RateLimited(
                    f"this job's webhooks were redelivered less than {interval:g} s ago; "
                    f"try again in {left:.1f} s",
                    retry_after=left,
                )
        ids = cast(list[str], self.redis.lrange(webhooks_key(job_id), 0, -1))
        if ids:
            self._redeliver(keys=[DUE_KEY, WAKE_KEY], args=[time.time(), *ids])
        return ids


def _delivery(fields: dict[str, str], history: list[str]) -> Delivery:
    record = DeliveryRecord.from_hash(fields)
    return Delivery(
        **record.model_dump(include=set(Delivery.model_fields)),
        history=[Attempt.model_validate_json(item) for item in history],
    )


class _DnsTimeout(Exception):
    """Not an OSError on purpose: ``check_url`` reads those as "cannot resolve" (permanent)."""


class _Deadline(threading.local):
    """The current attempt's deadline and sockets, per thread: sync httpx does its I/O in the
    calling thread, so the transport sees the attempt it serves."""

    at: float | None = None
    sockets: list[socket.socket]


_deadline = _Deadline()


class _Backend(httpcore.SyncBackend):
    """Connects within the attempt's deadline and hands the socket to its watchdog."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        at = _deadline.at
        if at is not None:
            left = at - time.monotonic()
            if left <= 0:
                raise httpcore.ConnectTimeout("the delivery deadline passed")
            timeout = left if timeout is None else min(timeout, left)
        stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
        if at is not None:
            _deadline.sockets.append(stream.get_extra_info("socket"))
        return stream


class _Transport(httpx.HTTPTransport):
    """httpx's transport without keep-alive, on ``_Backend``, ignoring proxy variables."""

    def __init__(self, max_connections: int) -> None:
        super().__init__(trust_env=False)
        # No keep-alive: requests go to pinned addresses, so a pooled connection could carry
        # one hostname's request (and TLS session) to another hostname on the same address.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=0,
            network_backend=_Backend(),
        )


@contextmanager
def _watchdog(deadline: float) -> Iterator[None]:
    """Shut down the attempt's sockets at ``deadline``: per-read timeouts alone let a receiver
    that drips bytes (headers, TLS handshake, body) hold a send for ever."""
    _deadline.at, _deadline.sockets = deadline, []
    sockets = _deadline.sockets

    def cut() -> None:
        for sock in sockets:
            with suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        _deadline.at, _deadline.sockets = None, []


class _HostSlots:
    """At most ``cap`` sends at once per destination host."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._busy: dict[str, int] = {}
        self._deferred: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, host: str) -> bool:
        with self._lock:
            if self._busy.get(host, 0) >= self.cap:
                return False
            self._busy[host] = self._busy.get(host, 0) + 1
            self._deferred.pop(host, None)
            return True

    def release(self, host: str) -> None:
        with self._lock:
            self._busy[host] -= 1
            if not self._busy[host]:
                del self._busy[host]

    def defer(self, host: str) -> int:
        """Count a delivery put back because ``host`` was busy; returns how many in a row."""
        with self._lock:
            self._deferred[host] = self._deferred.get(host, 0) + 1
            return self._deferred[host]


@dataclass
class _Outcome:
    status_code: int | None = None
    error: str | None = None
    wait: float | None = None
    permanent: bool = False


class Dispatcher:
    """Claims due deliveries and sends them; run it with ``run(stop)`` in a thread."""

    #: The lease outlasts the deadline by this much, so no one claims a delivery mid-send.
    lease_margin_seconds = 30.0

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
        self.resolver = resolver or system_resolver
        self.metrics = Recorder(client)
        self._claim = client.register_script(lua.source("webhook_claim"))
        self._begin = client.register_script(lua.source("webhook_begin"))
        self._record_script = client.register_script(lua.source("webhook_record"))
        self._hosts = _HostSlots(settings.webhook_per_host_concurrency)
        # getaddrinfo has no timeout: lookups run here and are waited for with one.
        self._dns = ThreadPoolExecutor(settings.webhook_concurrency, "webhook-dns")
        self.http = httpx.Client(
            transport=_Transport(settings.webhook_concurrency * 2),
            follow_redirects=False,
            headers={"user-agent": USER_AGENT},
            trust_env=False,
        )

    @property
    def lease_seconds(self) -> float:
        return self.settings.webhook_timeout_seconds + self.lease_margin_seconds

    def close(self) -> None:
        self.http.close()
        self._dns.shutdown(wait=False, cancel_futures=True)

    def claim(self, limit: int) -> list[str]:
        """Lease up to ``limit`` due deliveries to this dispatcher."""
        moment = time.time()
        lease = moment + self.lease_seconds
        claimed: list[str] = self._claim(keys=[DUE_KEY], args=[moment, limit, lease])
        return claimed

    def begin(self, delivery_id: str) -> int | None:
        """Count an attempt and renew the lease, before sending: returns the attempt's number,
        or None when it must not be sent (no longer pending, or older than the retry window,
        which ends it ``failed``)."""
        moment = time.time()
        result = self._begin(
            keys=[delivery_key(delivery_id), DUE_KEY, attempts_key(delivery_id)],
            args=[
                delivery_id,
                moment,
                moment + self.lease_seconds,
                self.settings.webhook_max_age_seconds,
                *self._history_args(),
            ],
        )
        if result[0] == "expired":
            self.metrics.inc("sdq_webhook_attempts_total", outcome="failed")
            log.info("webhook %s: older than the retry window -> failed", delivery_id)
        return int(result[1]) if result[0] == "send" else None

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set, each claim as soon as a slot is free."""
        size = self.settings.webhook_concurrency
        slots = threading.Semaphore(size)
        with ThreadPoolExecutor(size, thread_name_prefix="webhook") as pool:
            while not stop.is_set():
                if not slots.acquire(timeout=0.5):
                    continue
                free = 1
                while free < size and slots.acquire(blocking=False):
                    free += 1
                try:
                    claimed = self.claim(free)
                except redis.RedisError as exc:
                    log.warning("webhook dispatcher: %s; retrying", exc)
                    claimed = []
                for delivery_id in claimed:
                    pool.submit(self._in_slot, delivery_id, slots)
                for _ in range(free - len(claimed)):
                    slots.release()
                if len(claimed) < free:
                    self._idle(stop)
        self.close()

    def _in_slot(self, delivery_id: str, slots: threading.Semaphore) -> None:
        try:
            state = self.deliver(delivery_id)
        finally:
            slots.release()
        if state == "pending":
            # Its retry may be due before the idle wait the loop is in (up to 1 s) ends.
            with contextlib.suppress(redis.RedisError):
                self.redis.lpush(WAKE_KEY, delivery_id)

    def _idle(self, stop: threading.Event) -> None:
        """Wait for a wake-up or the next due time (at most 1 s, so ``stop`` is seen)."""
        if stop.is_set():
            return
        try:
            self.redis.blpop([WAKE_KEY], timeout=self._idle_wait())
        except redis.RedisError as exc:
            log.warning("webhook dispatcher: %s; retrying", exc)
            stop.wait(1.0)

    def _idle_wait(self) -> float:
        head = self.redis.zrange(DUE_KEY, 0, 0, withscores=True)
        if not head:
            return 1.0
        due = float(cast(list[tuple[str, float]], head)[0][1])
        return min(1.0, max(0.05, due - time.time()))

    def deliver(self, delivery_id: str) -> DeliveryState | None:
        """Make one attempt at a delivery and record it; returns its new state, or None when
        nothing was attempted (not pending, or its host busy: then it is due again shortly)."""
        try:
            return self._deliver(delivery_id)
        except Exception:
            log.exception("webhook %s: attempt failed unexpectedly", delivery_id)
            return None

    def _deliver(self, delivery_id: str) -> DeliveryState | None:
        fields = cast(dict[str, str], self.redis.hgetall(delivery_key(delivery_id)))
        if not fields or fields.get("state") != "pending":
            self.redis.zrem(DUE_KEY, delivery_id)
            return None
        record = DeliveryRecord.from_hash(fields)
        host = (urlsplit(record.url).hostname or "").lower()
        if not self._hosts.acquire(host):
            # Put back, not waited for: a slow host must not hold a slot that others could use.
            delay = min(self.settings.webhook_timeout_seconds, 0.2 * self._hosts.defer(host))
            due = time.time() + delay * random.uniform(1, 1.5)
            self.redis.zadd(DUE_KEY, {delivery_id: due}, xx=True)
            return None
        try:
            number = self.begin(delivery_id)
            if number is None:
                state = self.redis.hget(delivery_key(delivery_id), "state")
                return cast(DeliveryState, state) if state in ("failed", "gone") else None
            started = time.time()
            outcome = self._attempt(delivery_id, record, started)
            attempt = Attempt(
                at=started,
                status_code=outcome.status_code,
                error=outcome.error,
                duration_ms=int((time.time() - started) * 1000),
            )
            return self._record(delivery_id, record, number, attempt, outcome)
        finally:
            self._hosts.release(host)

    def _attempt(self, delivery_id: str, record: DeliveryRecord, started: float) -> _Outcome:
        deadline = time.monotonic() + self.settings.webhook_timeout_seconds
        try:
            body = webhook_body(self.redis, record)
            if body is None:
                return _Outcome(error="the job's record has expired", permanent=True)
            # Read afresh for every attempt: a rotation applies to the very next send.
            secrets = self.keys.signing_secrets(record.key_id)
            target = check_url(
                record.url,
                allow_loopback=self.settings.webhook_allow_loopback,
                resolver=self._bounded_resolver(deadline),
            )
            return self._post(target, delivery_id, body, secrets, deadline)
        except UnsafeUrl as exc:
            return _Outcome(error=exc.message, permanent=True)
        except NotFound:
            return _Outcome(error="the API key that owns this job no longer exists", permanent=True)
        except _DnsTimeout as exc:
            return _Outcome(error=str(exc))

    def _bounded_resolver(self, deadline: float) -> Resolver:
        def resolve(host: str, port: int) -> list[str]:
            wait = min(self.settings.webhook_dns_timeout_seconds, deadline - time.monotonic())
            future = self._dns.submit(self.resolver, host, port)
            try:
                return future.result(timeout=max(0.0, wait))
            except TimeoutError:
                future.cancel()
                raise _DnsTimeout(f"resolving {host!r} took longer than {wait:.1f} s") from None

        return resolve

    def _post(
        self, target: Target, delivery_id: str, body: str, secrets: list[str], deadline: float
    ) -> _Outcome:
        headers = sign(secrets, delivery_id, datetime.now(UTC), body)
        headers |= {"content-type": "application/json", "host": target.host_header()}
        # Connect to the address that was checked, whatever DNS says now.
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        timeout = self.settings.webhook_timeout_seconds
        left = deadline - time.monotonic()
        if left <= 0:
            return _Outcome(error=f"no answer within {timeout:g} s")
        outcome = _Outcome()
        try:
            with (
                _watchdog(deadline),
                self.http.stream(
                    "POST",
                    target.pinned_url(),
                    content=body,
                    headers=headers,
                    extensions=extensions,
                    timeout=left,
                ) as response,
            ):
                outcome.status_code = response.status_code
                outcome.wait = retry_after(response.headers.get("retry-after"))
                if not response.is_success:
                    outcome.error = f"HTTP {response.status_code}" + (
                        " (redirects are not followed)" if response.is_redirect else ""
                    )
                self._skim(response, deadline)
        except httpx.HTTPError as exc:
            if outcome.status_code is None:
                late = time.monotonic() >= deadline - 0.05
                outcome.error = f"no answer within {timeout:g} s" if late else _describe(exc)
        return outcome

    def _skim(self, response: httpx.Response, deadline: float) -> None:
        """Read at most ``webhook_max_response_bytes`` of the answer, within the deadline; the
        status is what counts, so a body cut short changes nothing."""
        limit, read = self.settings.webhook_max_response_bytes, 0
        if limit <= 0:
            return
        try:
            for chunk in response.iter_raw():
                read += len(chunk)
                if read >= limit or time.monotonic() >= deadline:
                    break
        except httpx.HTTPError:
            pass

    def _history_args(self) -> tuple[int, int]:
        return HISTORY, self.settings.delivery_ttl_seconds

    def _record(
        self,
        delivery_id: str,
        record: DeliveryRecord,
        number: int,
        attempt: Attempt,
        outcome: _Outcome,
    ) -> DeliveryState:
        next_at: float | None = None
        state: DeliveryState
        if attempt.status_code is not None and 200 <= attempt.status_code < 300:
            state = "delivered"
        elif attempt.status_code == 410:
            state = "gone"  # the receiver asked us to stop
        elif outcome.permanent:
            state = "failed"
        else:
            s = self.settings
            delay = backoff(number, s.webhook_retry_base_seconds, s.webhook_retry_max_seconds)
            delay = max(delay, outcome.wait or 0.0)
            # first_at is never moved (not by a redelivery either): retries end with the window.
            if attempt.at + delay > record.first_at + s.webhook_max_age_seconds:
                state = "failed"
            else:
                state, next_at = "pending", attempt.at + delay
        args: list[Any] = [
            delivery_id,
            number,
            attempt.model_dump_json(),
            state,
            next_at or "",
            attempt.status_code or "",
            attempt.error or "",
            *self._history_args(),
            time.time(),
        ]
        keys = [delivery_key(delivery_id), attempts_key(delivery_id), DUE_KEY]
        stored = cast(str, self._record_script(keys=keys, args=args))
        if stored in ("pending", "delivered", "failed", "gone"):
            state = cast(DeliveryState, stored)
        outcome_label = "retry" if state == "pending" else state
        self.metrics.inc("sdq_webhook_attempts_total", outcome=outcome_label)
        log.info(
            "webhook %s for job %s: attempt %d %s -> %s",
            delivery_id,
            record.job_id,
            number,
            attempt.status_code or attempt.error,
            stored,
        )
        return state


def _describe(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def serve(settings: Settings) -> None:
    """Run a dispatcher on ``settings.redis_url`` until SIGTERM or SIGINT (``sdq dispatcher``)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info(
            "webhook dispatcher: %s, finishing the sends in progress", signal.strsignal(signum)
        )
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("webhook dispatcher: %d slots", settings.webhook_concurrency)
        client = connect(settings.redis_url, timeout=settings.redis_socket_timeout_seconds)
        Dispatcher(client, settings).run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
