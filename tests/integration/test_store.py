"""The job store and key store against a real Valkey."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable

import pytest
import redis

from common.apikeys import ApiKey, AsyncKeyAuth, KeyStore
from common.errors import AuthError, Conflict, Forbidden, InsufficientCredits
from common.job import ImageResult, Job, JobRequest, JobStatus, new_job_id, now
from common.queue import GENERATE_TASK
from common.redis import connect_async
from common.redis_keys import events_key, job_key
from common.store import JobStore
from common.transport import task_message
from tests.factories import expire_lease


@pytest.fixture
def account(keys: KeyStore) -> Callable[[int], ApiKey]:
    def make(credits: int) -> ApiKey:
        return keys.create(credits)[1]

    return make


def make_job(key: ApiKey, cost: int = 2) -> Job:
    return Job(
        id=new_job_id(),
        key_id=key.id,
        tier="normal",
        status=JobStatus.QUEUED,
        request=JobRequest(prompt="a red fox"),
        seed=7,
        steps=4,
        cost=cost,
        created_at=now(),
    )


def test_create_debits_and_records(store: JobStore, keys: KeyStore, account) -> None:
    key = account(10)
    job = make_job(key, cost=4)
    assert store.create([job]).credits == 6
    assert keys.credits(key.id) == 6
    stored = store.get(job.id)
    assert stored.status is JobStatus.QUEUED and stored.request.prompt == "a red fox"
    assert [e["type"] for e in store.events(job.id)] == ["job.queued"]


def test_insufficient_credits_changes_nothing(
    store: JobStore, keys: KeyStore, rclient, account
) -> None:
    key = account(3)
    job = make_job(key, cost=4)
    with pytest.raises(InsufficientCredits, match="this request costs 4, the key has 3"):
        store.create([job])
    assert keys.credits(key.id) == 3
    assert not rclient.exists(job_key(job.id))
    assert not rclient.exists(events_key(job.id))


def test_task_messages_are_pushed_with_the_record_or_not_at_all(
    store: JobStore, rclient: redis.Redis, account
) -> None:
    queue = "sdq.test.outbox"
    rclient.delete(queue)
    poor = make_job(account(1), cost=4)
    with pytest.raises(InsufficientCredits):
        store.create([poor], messages=[task_message(GENERATE_TASK, [poor.id], queue, 0)])
    assert rclient.llen(queue) == 0
    key = account(10)
    jobs = [make_job(key), make_job(key)]
    messages = [task_message(GENERATE_TASK, [job.id], queue, 0) for job in jobs]
    idempotency = ("token-outbox", "digest")
    assert store.create(jobs, idempotency=idempotency, messages=messages).credits == 6
    replayed = store.create(jobs, idempotency=idempotency, messages=messages)
    assert replayed.replayed  # a replay pushes nothing more
    pushed = [json.loads(raw) for raw in rclient.lrange(queue, 0, -1)]
    assert sorted(m["headers"]["argsrepr"] for m in pushed) == sorted(
        repr([job.id]) for job in jobs
    )
    rclient.delete(queue)


def test_the_happy_path_logs_every_transition(store: JobStore, account) -> None:
    job = make_job(account(5))
    store.create([job])
    started = store.start(job.id)
    assert started.applied
    # The worker reads the job in the same step: the record as the start left it.
    assert started.job is not None and started.job.request == job.request
    assert started.job.status is JobStatus.RUNNING and started.job.attempts == 1
    assert started.job.started_at is not None and started.job.started_at >= job.created_at
    image = ImageResult(
        index=0,
        key="k",
        content_type="image/jpeg",
        size_bytes=1,
        sha256="0" * 64,
        seed=7,
        width=64,
        height=64,
    )
    assert store.succeed(job, [image], backend="local", model="tiny").applied
    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.backend == "local"
    assert done.images[0].key == "k" and done.started_at and done.finished_at
    assert [e["type"] for e in store.events(job.id)] == [
        "job.queued",
        "job.started",
        "job.succeeded",
    ]


def test_terminal_states_are_final(store: JobStore, keys: KeyStore, account) -> None:
    key = account(5)
    job = make_job(key)
    store.create([job])
    store.start(job.id)
    store.succeed(job, [], backend="local", model="tiny")
    for attempt in (lambda j: store.start(j.id), store.cancel, lambda j: store.fail(j, "late")):
        outcome = attempt(job)
        assert not outcome.applied and outcome.current is JobStatus.SUCCEEDED
    assert store.get(job.id).status is JobStatus.SUCCEEDED
    assert keys.credits(key.id) == 3  # no refund of a succeeded job
    assert len(store.events(job.id)) == 3


def test_a_queued_job_cannot_succeed_without_running(store: JobStore, account) -> None:
    job = make_job(account(5))
    store.create([job])
    outcome = store.succeed(job, [], backend="local", model="tiny")
    assert not outcome.applied and outcome.current is JobStatus.QUEUED


def test_failure_refunds_exactly_once(store: JobStore, keys: KeyStore, account) -> None:
    key = account(5)
    job = make_job(key, cost=2)
    store.create([job])
    store.start(job.id)
    first = store.fail(job, "out of memory")
    assert first.applied and first.credits == 5
    assert not store.fail(job, "again").applied
    assert keys.credits(key.id) == 5
    failed = store.get(job.id)
    assert failed.refunded and failed.error == "out of memory"


def test_concurrent_cancels_refund_once(store: JobStore, keys: KeyStore, account) -> None:
    key = account(10)
    job = make_job(key, cost=3)
    store.create([job])
    barrier = threading.Barrier(16)
    applied: list[bool] = []

    def cancel() -> None:
        barrier.wait()
        applied.append(store.cancel(job).applied)

    threads = [threading.Thread(target=cancel) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert applied.count(True) == 1
    assert keys.credits(key.id) == 10


def test_redelivery_counts_attempts(store: JobStore, account) -> None:
    job = make_job(account(5))
    store.create([job])
    assert store.start(job.id).attempts == 1
    refused = store.start(job.id)  # a spare message while the run's lease is live
    assert not refused.applied and refused.current is JobStatus.RUNNING
    expire_lease(store, job.id)
    assert store.start(job.id).attempts == 2  # the worker died; the broker redelivered
    assert store.get(job.id).attempts == 2


def test_finished_jobs_expire(rclient: redis.Redis, account) -> None:
    store = JobStore(rclient, finished_ttl=120)
    job = make_job(account(5))
    store.create([job])
    # A record that never ends expires too, as a last resort, long after any retry.
    assert rclient.ttl(job_key(job.id)) > 7 * 86400
    store.cancel(job)
    assert 0 < rclient.ttl(job_key(job.id)) <= 120
    assert 0 < rclient.ttl(events_key(job.id)) <= 120


def test_keys_are_stored_hashed(keys: KeyStore, rclient: redis.Redis) -> None:
    raw, record = keys.create(5, name="hashed")
    dump = []
    for name in rclient.scan_iter("sdq:apikey*"):
        kind = rclient.type(name)
        if kind == "hash":
            dump += list(rclient.hgetall(name).values())
        elif kind == "string":
            dump.append(rclient.get(name))
    assert dump and all(raw not in str(value) for value in dump)
    assert keys.authenticate(raw).id == record.id
    assert keys.authenticate(f"Bearer {raw}").id == record.id


@pytest.mark.parametrize(
    ("header", "error"),
    [(None, AuthError), ("", AuthError), ("Bearer ", AuthError), ("sdq_not-a-key", Forbidden)],
)
def test_bad_credentials(
    keys: KeyStore, redis_url: str, header: str | None, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        keys.authenticate(header)
    assert type(info.value) is error
    with pytest.raises(error) as info:
        asyncio.run(_authenticate_async(redis_url, header))
    assert type(info.value) is error


async def _authenticate_async(redis_url: str, header: str | None) -> ApiKey:
    client = connect_async(redis_url)
    try:
        return await AsyncKeyAuth(client).authenticate(header)
    finally:
        await client.aclose()


def test_async_auth_matches_the_sync_one(keys: KeyStore, redis_url: str) -> None:
    raw, record = keys.create(5, name="async")
    for header in (raw, f"Bearer {raw}"):
        assert asyncio.run(_authenticate_async(redis_url, header)) == keys.authenticate(header)
    assert keys.authenticate(raw) == record
    # A key whose record is gone (deleted by an operator) is refused, not half-read.
    keys.redis.delete(f"sdq:apikey:{record.id}")
    with pytest.raises(Forbidden):
        asyncio.run(_authenticate_async(redis_url, raw))
    with pytest.raises(Forbidden):
        keys.authenticate(raw)


def test_auth_sees_a_revoked_or_deleted_key_at_once(keys: KeyStore, redis_url: str) -> None:
    raw, record = keys.create(5, name="revoked")
    other, _ = keys.create(5, name="kept")

    async def scenario() -> None:
        client = connect_async(redis_url)
        auth = AsyncKeyAuth(client)
        try:
            assert (await auth.authenticate(raw)).id == record.id
            keys.revoke(record.id)
            # Nothing is remembered between requests: the next one is refused.
            with pytest.raises(Forbidden, match="revoked"):
                await auth.authenticate(raw)
            assert (await auth.authenticate(other)).name == "kept"
            keys.redis.delete(f"sdq:apikey:{keys.find(other).id}")
            with pytest.raises(Forbidden):
                await auth.authenticate(other)
        finally:
            await client.aclose()

    asyncio.run(scenario())
    with pytest.raises(Forbidden, match="revoked"):
        keys.authenticate(raw)


def test_async_create_is_the_same_step(
    store: JobStore, keys: KeyStore, rclient: redis.Redis, redis_url: str, account
) -> None:
    queue = "sdq.test.outbox-async"
    rclient.delete(queue)
    key = account(5)
    first, second, third = make_job(key, cost=2), make_job(key, cost=2), make_job(key, cost=2)

    async def scenario() -> None:
        client = connect_async(redis_url)
        aio_store = JobStore(rclient, aio=client)
        try:
            message = [task_message(GENERATE_TASK, [first.id], queue, 0)]
            created = await aio_store.acreate([first], idempotency=("t1", "d1"), messages=message)
            assert created.credits == 3 and not created.replayed
            again = await aio_store.acreate([first], idempotency=("t1", "d1"), messages=message)
            assert again.replayed and again.job_ids == [first.id]
            with pytest.raises(Conflict, match="already used with a different request"):
                await aio_store.acreate([second], idempotency=("t1", "other"))
            await aio_store.acreate([second])
            with pytest.raises(InsufficientCredits, match="costs 2, the key has 1"):
                await aio_store.acreate([third])
        finally:
            await client.aclose()

    asyncio.run(scenario())
    assert keys.credits(key.id) == 1
    assert store.get(first.id).status is JobStatus.QUEUED
    assert not rclient.exists(job_key(third.id))
    assert [json.loads(m)["headers"]["argsrepr"] for m in rclient.lrange(queue, 0, -1)] == [
        repr([first.id])
    ]
    rclient.delete(queue)
    with pytest.raises(RuntimeError, match="without an asyncio client"):
        asyncio.run(store.acreate([make_job(key)]))
