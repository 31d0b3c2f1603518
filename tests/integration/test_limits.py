"""Per-key limits and fair share in the job store, against a real Valkey: the request rate,
the cap on jobs at once, the priority ceiling, revocation, and round robin between keys."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
import redis

from common.apikeys import ApiKey, KeyStore
from common.errors import Forbidden, RateLimited
from common.job import Job, JobRequest, JobStatus, new_job_id, now
from common.redis_keys import job_key, key_jobs_key
from common.store import JobStore

Account = Callable[..., ApiKey]


@pytest.fixture
def account(keys: KeyStore) -> Account:
    def make(credits: int = 100, **limits: object) -> ApiKey:
        return keys.create(credits, name="limits", **limits)[1]  # type: ignore[arg-type]

    return make


def job(key: ApiKey, *, tier: str = "budget", priority: int = 5, cost: int = 1) -> Job:
    return Job(
        id=new_job_id(),
        key_id=key.id,
        tier=tier,
        status=JobStatus.QUEUED,
        request=JobRequest(prompt="fair", tier=tier),
        seed=1,
        steps=1,
        cost=cost,
        priority=priority,
        created_at=now(),
    )


def test_the_request_rate_refuses_a_burst_then_serves_again(keys: KeyStore) -> None:
    raw, _ = keys.create(10, rate=5)
    outcomes = []
    for _ in range(40):
        try:
            keys.authenticate(raw)
            outcomes.append("ok")
        except RateLimited as exc:
            outcomes.append(exc.retry_after)
    assert outcomes[:5] == ["ok"] * 5  # a burst of as many as the rate
    waits = [o for o in outcomes if o != "ok"]
    assert len(waits) >= 30 and all(0 < float(w) <= 1.0 for w in waits)
    with pytest.raises(RateLimited, match="5 requests a second") as info:
        keys.authenticate(raw)
    assert info.value.details["rate_limit"] == "5"
    time.sleep(float(info.value.retry_after) + 0.05)
    assert keys.authenticate(raw).credits == 10


def test_a_key_without_a_rate_gets_the_default(rclient: redis.Redis) -> None:
    keys = KeyStore(rclient, default_rate=2)
    raw, _ = keys.create(1)
    keys.authenticate(raw)
    keys.authenticate(raw)
    with pytest.raises(RateLimited, match="2 requests a second"):
        keys.authenticate(raw)


def test_the_cap_on_jobs_at_once_refuses_whole_and_charges_nothing(
    store: JobStore, keys: KeyStore, account: Account, rclient: redis.Redis
) -> None:
    key = account(100, max_jobs=3)
    first = [job(key) for _ in range(3)]
    store.create(first[:1])
    store.create(first[1:])
    assert keys.get(key.id).active == 3
    fourth = job(key)
    with pytest.raises(RateLimited, match="its cap is 3") as info:
        store.create([fourth])
    assert info.value.retry_after > 0
    assert keys.credits(key.id) == 97
    assert not rclient.exists(job_key(fourth.id))
    # A job that ends frees its place, whatever its end.
    store.cancel(first[0])
    store.start(first[1].id)
    store.succeed(store.get(first[1].id), [], backend="local", model="tiny")
    assert keys.get(key.id).active == 1
    batch = [job(key) for _ in range(3)]
    with pytest.raises(RateLimited):
        store.create(batch)  # 1 + 3 > 3: the whole batch is refused
    assert keys.credits(key.id) == 98  # the cancel refunded 1; the batch cost nothing
    assert not any(rclient.exists(job_key(j.id)) for j in batch)
    store.create(batch[:2])
    assert keys.get(key.id).active == 3


def test_a_refused_create_leaves_nothing(
    store: JobStore, keys: KeyStore, account: Account, rclient: redis.Redis
) -> None:
    key = account(1)
    jobs = [job(key), job(key)]
    with pytest.raises(Exception, match="not enough credits"):
        store.create(jobs)
    assert keys.get(key.id).active == 0 and keys.credits(key.id) == 1
    assert not rclient.exists(key_jobs_key(key.id), key_jobs_key(key.id, JobStatus.QUEUED))
    keys.revoke(key.id)
    with pytest.raises(Forbidden, match="revoked"):
        store.create(jobs[:1])
    assert keys.credits(key.id) == 1


def test_listing_by_status_reads_its_own_index(store: JobStore, account: Account) -> None:
    key = account(100)
    jobs = [job(key) for _ in range(5)]
    store.create(jobs)
    store.cancel(jobs[1])
    store.cancel(jobs[3])
    canceled, cursor = store.list_for_key(key.id, limit=10, status=JobStatus.CANCELED)
    assert [j.id for j in canceled] == [jobs[3].id, jobs[1].id] and cursor is None
    queued, cursor = store.list_for_key(key.id, limit=2, status=JobStatus.QUEUED)
    assert [j.id for j in queued] == [jobs[4].id, jobs[2].id] and cursor == 2
    rest, cursor = store.list_for_key(key.id, limit=2, offset=2, status=JobStatus.QUEUED)
    assert [j.id for j in rest] == [jobs[0].id] and cursor is None


def test_keys_take_turns_within_a_tier_and_priority(store: JobStore, account: Account) -> None:
    tier = f"fair{uuid.uuid4().hex[:6]}"
    heavy, light = account(1000), account(10)
    many = [job(heavy, tier=tier) for _ in range(300)]
    for start in range(0, 300, 100):
        store.create(many[start : start + 100])
    mine = job(light, tier=tier)
    store.create([mine])
    # Messages are served in their order (the heavy key's first); each takes the next job
    # in turn by key.
    order = []
    for sent_for in [*many[:4], mine]:
        taken = store.take(sent_for.id, task_id=uuid.uuid4().hex)
        assert taken is not None
        order.append(taken)
        store.start(taken)
    assert order.index(mine.id) <= 2, order
    # Another priority is its own turn: a job there is never taken by this one's messages.
    urgent = job(light, tier=tier, priority=9)
    store.create([urgent])
    assert store.take(many[10].id, task_id=uuid.uuid4().hex) != urgent.id
    assert store.take(urgent.id, task_id=uuid.uuid4().hex) == urgent.id


def test_a_redelivered_message_runs_the_job_it_took(store: JobStore, account: Account) -> None:
    tier = f"fair{uuid.uuid4().hex[:6]}"
    a, b = account(10), account(10)
    first, second = job(a, tier=tier), job(b, tier=tier)
    store.create([first])
    store.create([second])
    task = uuid.uuid4().hex
    taken = store.take(second.id, task_id=task)
    assert taken == first.id  # the first in turn, whichever job the message was sent for
    store.start(taken)
    assert store.take(second.id, task_id=task) == first.id  # the worker died; redelivered
    # Canceled jobs are skipped; a message with nothing left to run takes nothing.
    store.cancel(second)
    assert store.take(second.id, task_id=uuid.uuid4().hex) is None
