"""The webhook dispatcher against a real Valkey, with injected resolvers and a canary."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterator

import pytest

from common.job import Job
from common.keys import KeyStore
from common.redis import connect
from common.settings import Settings
from common.store import DUE_KEY, JobStore, delivery_id
from common.webhooks import Deliveries, Dispatcher, backoff, retry_after
from tests.factories import queued_job


@pytest.fixture
def store(redis_url: str) -> JobStore:
    """A database of its own: the session's API runs a dispatcher on database 0."""
    return JobStore(connect(redis_url.rsplit("/", 1)[0] + "/1"))


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
    [delivery] = Deliveries(store.redis).for_job(job.id)
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


def test_backoff_grows_and_retry_after_parses() -> None:
    delays = [backoff(n, 5, 3600) for n in range(1, 8)]
    assert all(b > a for a, b in itertools.pairwise(delays))
    assert 3.75 <= delays[0] <= 6.25 and backoff(30, 5, 3600) <= 3600 * 1.25
    assert retry_after("120") == 120
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0
    assert retry_after("soon") is None
