"""The reconciler against a real Valkey: jobs whose worker died are requeued (or failed and
refunded once they lost too many), queued jobs without a message get one after two rounds,
one reconciler leads; and the lease rules it relies on (takeover, refused starts, stale
heartbeats)."""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from common.apikeys import ApiKey, KeyStore
from common.job import Job, JobRequest, JobStatus
from common.queue import broker_priority, make_celery
from common.redis import connect
from common.redis_keys import LEADER_KEY, RUNNING_KEY, apikey_key, job_key, taken_key
from common.settings import Settings
from common.store import JobStore
from common.tiers import load_tiers
from common.transport import PRIORITY_STEPS, queue_key
from producer.jobs import JobService
from producer.reconciler import UNACKED_KEY, Reconciler
from workers.lease import Lease

MAX_DELIVERIES = 3


@dataclass
class Stack:
    """One database of this module's own: the producer's side (``jobs``, ``reconciler``)
    and two workers' stores, one whose leases run out in a second, one with long ones."""

    client: redis.Redis
    keys: KeyStore
    jobs: JobService
    reconciler: Reconciler
    short: JobStore
    long: JobStore

    def submit(self, credits: int = 10, tier: str = "normal") -> tuple[Job, ApiKey]:
        """A job sent the way the API sends it: charged, recorded and its message pushed."""
        _, key = self.keys.create(credits, name="reconciler")
        request = JobRequest(prompt="a lighthouse", tier=tier, steps=2)
        return self.jobs.submit(key, [request]).jobs[0], key

    def record_only(self, credits: int = 10, tier: str = "normal") -> tuple[Job, ApiKey]:
        """A job charged and recorded whose message never reached the broker."""
        _, key = self.keys.create(credits, name="reconciler")
        job = self.jobs.prepare(key, JobRequest(prompt="a lighthouse", tier=tier, steps=2))
        self.jobs.store.create([job])
        return job, key

    def queue_lists(self, tier: str = "normal") -> list[str]:
        queue = self.jobs.tiers.get(tier).queue
        return [queue_key(queue, p) for p in PRIORITY_STEPS]

    def messages(self, tier: str = "normal") -> list[dict[str, Any]]:
        """The task messages waiting in the tier's broker lists."""
        found = []
        for name in self.queue_lists(tier):
            found += [json.loads(raw) for raw in self.client.lrange(name, 0, -1)]
        return found

    def receive(self, tier: str = "normal") -> tuple[str, str]:
        """Pop one message as a worker's BRPOP would: (the job id it was sent for, task id)."""
        for name in self.queue_lists(tier):
            raw = self.client.rpop(name)
            if isinstance(raw, str):
                return args_and_id(json.loads(raw))
        raise AssertionError(f"no message waiting for tier {tier}")


def args_and_id(message: dict[str, Any]) -> tuple[str, str]:
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return args[0], message["headers"]["id"]


def expire(client: redis.Redis, job_id: str) -> None:
    """End a running job's lease now, in its record and in sdq:running, as the death of its
    worker does once the lease runs out."""
    client.hset(job_key(job_id), "lease_until", "0")
    client.zadd(RUNNING_KEY, {job_id: 0}, xx=True)


def acted(done: Counter[str]) -> Counter[str]:
    """A round's actions without the zero counts."""
    return +done


@pytest.fixture
def stack(redis_url: str) -> Iterator[Stack]:
    url = redis_url.rsplit("/", 1)[0] + "/7"
    client = connect(url)
    client.flushdb()
    settings = Settings(
        _env_file=None,
        redis_url=url,
        broker_url=url,
        tiers_file=None,
        max_deliveries=MAX_DELIVERIES,
        reconcile_interval_seconds=0.5,
    )
    tiers = load_tiers(settings.tiers_file)
    store = JobStore(client, finished_ttl=3600, lease_seconds=settings.lease_seconds)
    jobs = JobService(settings, store, tiers, make_celery(settings, tiers))
    assert jobs.enqueue_in_store
    yield Stack(
        client=client,
        keys=KeyStore(client),
        jobs=jobs,
        reconciler=Reconciler(jobs),
        short=JobStore(client, finished_ttl=3600, lease_seconds=1.0),
        long=JobStore(client, finished_ttl=3600, lease_seconds=60.0),
    )
    client.flushdb()


def run_next(stack: Stack, store: JobStore, tier: str = "normal") -> tuple[str, Any]:
    """What a worker does with the next message: take a job with it and start it."""
    job_id, task_id = stack.receive(tier)
    taken = store.take(job_id, task_id)
    assert taken is not None
    return task_id, store.start(taken)


# (a) A run whose lease ran out is requeued, once; a live one is left alone.


def test_an_expired_lease_is_requeued_with_a_fresh_message(stack: Stack) -> None:
    job, key = stack.submit()
    first_task, started = run_next(stack, stack.short)
    assert started.applied and started.attempts == 1
    assert stack.messages() == []
    assert stack.short.expired_leases() == []
    time.sleep(1.2)  # the worker died: nobody renews the lease
    assert stack.short.expired_leases() == [job.id]

    assert acted(stack.reconciler.once()) == Counter(requeued=1)

    again = stack.jobs.store.get(job.id)
    assert again.status is JobStatus.QUEUED and again.attempts == 1
    assert stack.client.zscore(RUNNING_KEY, job.id) is None
    assert stack.client.zscore(f"sdq:queued:{job.tier}", job.id) is not None
    assert stack.client.zscore(f"sdq:apikey:{key.id}:jobs:queued", job.id) is not None
    assert stack.client.zscore(f"sdq:apikey:{key.id}:jobs:running", job.id) is None
    (message,) = stack.messages()
    queue = stack.jobs.tiers.get(job.tier).queue
    wanted = queue_key(queue, broker_priority(job.priority, stack.jobs.settings.redis_url))
    assert stack.client.llen(wanted) == 1
    sent_for, task_id = args_and_id(message)
    assert sent_for == job.id and task_id != first_task
    assert message["headers"]["task"] == "sdq.generate"
    assert message["properties"]["delivery_info"]["routing_key"] == queue
    assert stack.keys.credits(key.id) == 10 - job.cost  # charged once, not refunded
    metric = stack.client.hgetall("sdq:metrics:sdq_reconciled_total")
    assert [float(v) for k, v in metric.items() if '"requeued"' in k] == [1.0]

    assert acted(stack.reconciler.once()) == Counter()
    assert len(stack.messages()) == 1


def test_a_live_lease_is_left_alone(stack: Stack) -> None:
    job, _ = stack.submit()
    _, started = run_next(stack, stack.long)
    assert started.applied
    assert acted(stack.reconciler.once()) == Counter()
    assert stack.jobs.store.get(job.id).status is JobStatus.RUNNING
    assert stack.messages() == []
    assert not stack.jobs.store.requeue(job.id, stack.jobs.message(job))
    assert stack.messages() == []


def test_a_lease_renewed_after_the_scan_is_left_alone(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scan of sdq:running and the action are two steps: a worker's heartbeat (or a
    # takeover) in between must win, whether the job would be requeued or failed.
    requeue, _ = stack.submit()
    give_up, _ = stack.submit()
    for _ in range(2):
        assert run_next(stack, stack.long)[1].applied  # leases live for a minute
    stack.client.hset(job_key(give_up.id), "attempts", str(MAX_DELIVERIES))
    stale = [requeue.id, give_up.id]
    monkeypatch.setattr(stack.jobs.store, "expired_leases", lambda limit=100: stale)
    done = stack.reconciler.once()
    assert done["requeued"] == 0 and done["failed"] == 0
    for job in (requeue, give_up):
        assert stack.jobs.store.get(job.id).status is JobStatus.RUNNING


# (b) A job that lost its worker max_deliveries times fails, refunded once.


def test_after_max_deliveries_lost_runs_the_job_fails_refunded_once(stack: Stack) -> None:
    job, key = stack.submit(credits=10)
    assert stack.keys.credits(key.id) == 10 - job.cost
    for attempt in range(1, MAX_DELIVERIES + 1):
        _, started = run_next(stack, stack.short)
        assert started.applied and started.attempts == attempt
        expire(stack.client, job.id)
        done = acted(stack.reconciler.once())
        if attempt < MAX_DELIVERIES:
            assert done == Counter(requeued=1), attempt
            assert stack.jobs.store.get(job.id).status is JobStatus.QUEUED
        else:
            assert done == Counter(failed=1)
    failed = stack.jobs.store.get(job.id)
    assert failed.status is JobStatus.FAILED and failed.refunded
    assert failed.attempts == MAX_DELIVERIES
    assert (
        failed.error == f"gave up after {MAX_DELIVERIES} deliveries: the worker was lost each time"
    )
    assert stack.keys.credits(key.id) == 10
    assert stack.client.zscore(RUNNING_KEY, job.id) is None
    assert stack.client.hget(apikey_key(key.id), "active") == "0"

    # Nothing more: no second refund, no message for a job that ended.
    before = len(stack.messages())
    for _ in range(3):
        assert acted(stack.reconciler.once()) == Counter()
    assert not stack.jobs.store.fail(failed, "again").applied
    assert stack.keys.credits(key.id) == 10
    assert len(stack.messages()) == before
    refunded = [e for e in stack.jobs.store.events(job.id) if e["type"] == "job.failed"]
    assert len(refunded) == 1


# (c) A queued job without a message gets one, after two rounds; one with its message not.


def test_a_queued_job_without_a_message_gets_one_after_two_rounds(stack: Stack) -> None:
    job, _ = stack.record_only()
    assert stack.messages() == []
    assert acted(stack.reconciler.once()) == Counter()  # the deficit is only noted
    assert stack.messages() == []
    assert acted(stack.reconciler.once()) == Counter(enqueued=1)
    (message,) = stack.messages()
    assert args_and_id(message)[0] == job.id
    for _ in range(3):
        assert acted(stack.reconciler.once()) == Counter()
    assert len(stack.messages()) == 1
    # And the message runs the job.
    _, started = run_next(stack, stack.long)
    assert started.applied and started.job is not None and started.job.id == job.id


def test_a_job_with_its_message_is_not_given_a_second(stack: Stack) -> None:
    stack.submit()
    stack.submit(tier="budget")
    for _ in range(4):
        assert acted(stack.reconciler.once()) == Counter()
    assert len(stack.messages()) == 1 and len(stack.messages("budget")) == 1


def test_a_deficit_seen_in_one_round_only_sends_nothing(stack: Stack) -> None:
    # A submit between its charge and its publish (another broker) looks like this once.
    job, _ = stack.record_only()
    assert acted(stack.reconciler.once()) == Counter()
    queue_list, payload = stack.jobs.message(job)
    stack.client.lpush(queue_list, payload)  # the late publish
    assert acted(stack.reconciler.once()) == Counter()
    assert acted(stack.reconciler.once()) == Counter()
    assert len(stack.messages()) == 1


def test_only_the_missing_messages_are_sent(stack: Stack) -> None:
    stack.submit()
    stack.record_only()
    stack.record_only()
    assert acted(stack.reconciler.once()) == Counter()
    assert acted(stack.reconciler.once()) == Counter(enqueued=2)
    assert len(stack.messages()) == 3
    assert acted(stack.reconciler.once()) == Counter()


def test_a_delivered_message_counts_until_it_took_a_job(stack: Stack) -> None:
    # kombu keeps a delivered, unacked message in its `unacked` hash: a worker holds it.
    job, _ = stack.record_only()
    _, payload = stack.jobs.message(job)
    _, task_id = args_and_id(json.loads(payload))
    queue = stack.jobs.tiers.get(job.tier).queue
    stack.client.hset(UNACKED_KEY, "tag-1", json.dumps([json.loads(payload), "", queue]))
    for _ in range(3):
        assert acted(stack.reconciler.once()) == Counter()
    # That message took another job (fair share): this one still lacks one.
    stack.client.set(taken_key(task_id), "job_other")
    assert acted(stack.reconciler.once()) == Counter()
    assert acted(stack.reconciler.once()) == Counter(enqueued=1)
    assert args_and_id(stack.messages()[0])[0] == job.id


# (d) One leader.


def test_only_one_of_two_reconcilers_leads(stack: Stack) -> None:
    other = Reconciler(stack.jobs)
    assert stack.reconciler.lead()
    assert not other.lead()
    assert stack.reconciler.lead()  # the leader keeps it
    assert not other.lead()
    assert stack.client.get(LEADER_KEY) == stack.reconciler.token
    ttl = stack.client.pttl(LEADER_KEY)
    assert 0 < ttl <= 1500
    stack.client.pexpire(LEADER_KEY, 1)  # the leader died: its lease runs out
    time.sleep(0.05)
    assert other.lead()
    assert not stack.reconciler.lead()


# (e) A requeued job runs again from its new message, as attempt 2.


def test_a_requeued_job_is_taken_and_started_by_its_new_message(stack: Stack) -> None:
    job, key = stack.submit()
    first_task, started = run_next(stack, stack.short)
    assert started.attempts == 1
    expire(stack.client, job.id)
    assert acted(stack.reconciler.once()) == Counter(requeued=1)

    second_task, again = run_next(stack, stack.long)
    assert second_task != first_task
    assert again.applied and again.attempts == 2
    assert again.job is not None and again.job.id == job.id
    assert again.job.status is JobStatus.RUNNING
    lease = float(stack.client.hget(job_key(job.id), "lease_until") or 0)
    assert lease > time.time() + 50
    assert stack.client.zscore(RUNNING_KEY, job.id) == pytest.approx(lease)
    assert stack.client.zscore(f"sdq:apikey:{key.id}:jobs:running", job.id) is not None
    assert stack.client.zscore(f"sdq:queued:{job.tier}", job.id) is None

    # The first message, redelivered by the broker, finds the same job and is dropped.
    assert stack.long.take(job.id, first_task) == job.id
    spare = stack.long.start(job.id)
    assert not spare.applied and spare.current is JobStatus.RUNNING
    assert stack.jobs.store.get(job.id).attempts == 2
    assert acted(stack.reconciler.once()) == Counter()
    assert stack.keys.credits(key.id) == 10 - job.cost


def test_a_requeued_job_goes_first_in_its_keys_turn(stack: Stack) -> None:
    # It waited its turn once already: the next message of its tier and priority runs it,
    # not the key's job queued behind it.
    _, key = stack.keys.create(10, name="reconciler")
    requests = [JobRequest(prompt=f"a lighthouse {n}", steps=2) for n in range(2)]
    first, second = stack.jobs.submit(key, requests).jobs
    _, started = run_next(stack, stack.short)
    assert started.job is not None and started.job.id == first.id
    expire(stack.client, first.id)
    assert acted(stack.reconciler.once()) == Counter(requeued=1)
    sent_for, _ = args_and_id(stack.messages()[-1])  # the oldest: the second job's own
    assert sent_for == second.id
    _, again = run_next(stack, stack.long)
    assert again.job is not None and again.job.id == first.id and again.attempts == 2
    _, then = run_next(stack, stack.long)
    assert then.job is not None and then.job.id == second.id and then.attempts == 1
    assert stack.messages() == []


# (f) Lease rules: a live lease refuses a start, a stale attempt renews nothing.


def test_a_start_under_a_live_lease_is_refused(stack: Stack) -> None:
    job, _ = stack.submit()
    _, started = run_next(stack, stack.long)
    assert started.applied and started.attempts == 1
    lease = stack.client.hget(job_key(job.id), "lease_until")
    refused = stack.long.start(job.id)
    assert not refused.applied and refused.current is JobStatus.RUNNING
    assert refused.job is None
    assert stack.client.hget(job_key(job.id), "attempts") == "1"
    assert stack.client.hget(job_key(job.id), "lease_until") == lease


def test_a_heartbeat_from_a_stale_attempt_renews_nothing(stack: Stack) -> None:
    job, _ = stack.submit()
    _, first = run_next(stack, stack.short)
    assert stack.short.heartbeat(job.id, 1) is JobStatus.RUNNING  # its own run renews
    expire(stack.client, job.id)
    taken = stack.long.start(job.id)  # another worker takes the job over
    assert taken.applied and taken.attempts == 2
    lease = stack.client.hget(job_key(job.id), "lease_until")
    score = stack.client.zscore(RUNNING_KEY, job.id)

    assert stack.short.heartbeat(job.id, 1) is None
    assert stack.short.heartbeat(job.id, 3) is None
    assert stack.client.hget(job_key(job.id), "lease_until") == lease
    assert stack.client.zscore(RUNNING_KEY, job.id) == score
    assert stack.long.heartbeat(job.id, 2) is JobStatus.RUNNING

    # The old run's lease thread notices it lost the job.
    with Lease(stack.short, job.id, first.attempts) as old:
        deadline = time.monotonic() + 3
        while not old.lost and time.monotonic() < deadline:
            time.sleep(0.05)
    assert old.lost
    with Lease(stack.short, job.id, taken.attempts) as current:
        time.sleep(0.5)
    assert not current.lost


def test_a_heartbeat_of_an_ended_job_renews_nothing(stack: Stack) -> None:
    job, _ = stack.submit()
    _, started = run_next(stack, stack.long)
    stack.long.cancel(job)
    assert stack.long.heartbeat(job.id, started.attempts) is None
    assert stack.client.zscore(RUNNING_KEY, job.id) is None
    assert acted(stack.reconciler.once()) == Counter()
