"""The webhook dispatcher against a real Valkey, with injected resolvers and a canary."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterator
from typing import cast

import pytest
from standardwebhooks.webhooks import Webhook

from common.apikeys import KeyStore
from common.http import retry_after
from common.job import Job
from common.records import DeliveryRecord
from common.redis import connect
from common.redis_keys import DUE_KEY, delivery_key, job_key
from common.settings import Settings
from common.store import JobStore, delivery_id, webhook_body
from common.webhooks import Deliveries, Dispatcher, backoff
from tests.factories import queued_job
from tests.receiver import Receiver


@pytest.fixture
def settings() -> Settings:
    """Only Valkey is needed here, not the session's whole stack."""
    return Settings(_env_file=None, webhook_allow_loopback=True, webhook_timeout_seconds=3)


@pytest.fixture
def store(redis_url: str) -> JobStore:
    """A database of its own: the session's API runs a dispatcher on database 0."""
    return JobStore(connect(redis_url.rsplit("/", 1)[0] + "/1"))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def keys(store: JobStore) -> KeyStore:
    return KeyStore(store.redis)


@pytest.fixture
def canary() -> Iterator[tuple[int, list[int]]]:
    """A loopback listener that counts connections."""
    hits: list[int] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            hits.append(1)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], hits
    stop.set()
    thread.join()
    server.close()


def job_with_webhook(store: JobStore, keys: KeyStore, url: str) -> Job:
    # Straight into the store: the submit-time check is not involved.
    return queued_job(store, keys, webhook_url=url, webhook_events=["job.queued"])


def test_send_time_check_refuses_a_name_that_now_resolves_to_loopback(
    settings: Settings, store: JobStore, keys: KeyStore, canary: tuple[int, list[int]]
) -> None:
    port, hits = canary
    job = job_with_webhook(store, keys, f"http://hooks.example.com:{port}/x")
    strict = settings.model_copy(update={"webhook_allow_loopback": False})
    dispatcher = Dispatcher(store.redis, strict, resolver=lambda host, port: ["127.0.0.1"])
    did = delivery_id(job.id, "job.queued")
    assert dispatcher.deliver(did) == "failed"
    assert hits == []
    [delivery] = Deliveries(store.redis, settings).for_job(job.id)
    assert delivery.state == "failed" and delivery.attempts == 1
    assert delivery.history[0].error == (
        "webhook_url: 'hooks.example.com' resolves to 127.0.0.1, which is a loopback address"
    )
    assert store.redis.zscore(DUE_KEY, did) is None  # no retry of a refused address


def test_the_checked_address_is_the_one_connected_to(
    settings: Settings, store: JobStore, keys: KeyStore, canary: tuple[int, list[int]]
) -> None:
    port, hits = canary
    job = job_with_webhook(store, keys, f"http://hooks.example.com:{port}/x")
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])
    dispatcher = Dispatcher(store.redis, settings, resolver=lambda host, port: next(answers))
    dispatcher.deliver(delivery_id(job.id, "job.queued"))
    assert hits == [1]  # it connected to the address it checked, and resolved once


def test_the_body_from_the_store_is_what_is_signed_and_sent(
    settings: Settings, store: JobStore, keys: KeyStore, receiver: Receiver
) -> None:
    job = job_with_webhook(store, keys, receiver.url + "/signed")
    did = delivery_id(job.id, "job.queued")
    record = cast(dict[str, str], store.redis.hgetall(delivery_key(did)))
    assert "body" not in record  # built at send time, from the job's one stored copy
    dispatcher = Dispatcher(store.redis, settings)
    assert dispatcher.deliver(did) == "delivered"
    [received] = receiver.at("/signed")
    body = webhook_body(store.redis, DeliveryRecord.from_hash(record))
    assert body is not None and received.body.decode() == body
    secret = keys.get(job.key_id).webhook_secret
    Webhook(secret).verify(received.body, received.headers)  # raises when it does not match
    assert received.headers["webhook-id"] == did
    dispatcher.close()


def test_a_delivery_whose_job_expired_fails(
    settings: Settings, store: JobStore, keys: KeyStore, receiver: Receiver
) -> None:
    job = job_with_webhook(store, keys, receiver.url + "/expired")
    store.redis.delete(job_key(job.id))
    dispatcher = Dispatcher(store.redis, settings)
    assert dispatcher.deliver(delivery_id(job.id, "job.queued")) == "failed"
    assert receiver.at("/expired") == []
    [delivery] = Deliveries(store.redis, settings).for_job(job.id)
    assert delivery.last_error == "the job's record has expired"
    dispatcher.close()


def test_backoff_grows_and_retry_after_parses() -> None:
    delays = [backoff(n, 5, 3600) for n in range(1, 8)]
    assert all(b > a for a, b in itertools.pairwise(delays))
    assert 3.75 <= delays[0] <= 6.25 and backoff(30, 5, 3600) <= 3600 * 1.25
    assert retry_after("120") == 120
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0
    assert retry_after("soon") is None
