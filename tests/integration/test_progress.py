"""Step reporting in batches, against a real Valkey."""

from __future__ import annotations

import json
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.apikeys import KeyStore
from common.job import JobStatus
from common.redis_keys import events_channel
from common.store import JobStore
from tests.factories import queued_job
from workers.progress import Canceled, StepReporter


def running(store: JobStore, keys: KeyStore):
    job = queued_job(store, keys, steps=8)
    assert store.start(job.id).applied
    return job


def test_every_step_is_published_in_order_before_the_reporter_closes(
    store: JobStore, keys: KeyStore, rclient: redis.Redis
) -> None:
    job = running(store, keys)
    pubsub = rclient.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(events_channel(job.id))
    try:
        with StepReporter(store, job) as on_step:
            for step in range(1, 9):
                on_step(step, 8)
                time.sleep(0.02)  # steps of 20 ms: several go in each batch
        # Leaving the block waited for all eight: they are already out, in order.
        events = []
        deadline = time.monotonic() + 2
        while len(events) < 8 and time.monotonic() < deadline:
            if (message := pubsub.get_message(timeout=0.1)) is None:
                continue  # the subscription's confirmation, or nothing yet
            events.append(json.loads(message["data"]))
    finally:
        pubsub.close()
    assert [e["type"] for e in events] == ["job.progress"] * 8
    assert [e["data"]["progress"]["step"] for e in events] == list(range(1, 9))
    # Each event carries the time of its own step, not of the batch that sent it.
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps) and len(set(stamps)) == 8
    assert store.get(job.id).progress == {"step": 8, "total": 8}


def test_a_cancel_stops_the_loop_within_the_interval_and_one_step(
    store: JobStore, keys: KeyStore
) -> None:
    job = running(store, keys)
    reached = 0
    with pytest.raises(Canceled), StepReporter(store, job, interval=0.1) as on_step:
        for step in range(1, 12):
            on_step(step, 11)
            reached = step
            if step == 3:
                store.cancel(job)
            time.sleep(0.05)  # a denoising step: the store's answer arrives meanwhile
    # Step 3 sent a batch (0.1 s in), then the cancel came: the next batch, 0.1 s and two
    # 50 ms steps later, sees it and stops the loop in step 5's callback.
    assert reached == 4
    assert store.get(job.id).status is JobStatus.CANCELED


def test_a_redis_outage_loses_steps_not_the_job(
    store: JobStore, keys: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    job = running(store, keys)
    unreachable = JobStore(redis.Redis(port=1, retry=Retry(NoBackoff(), 0)))
    with StepReporter(unreachable, job) as on_step:
        on_step(1, 8)
        on_step(2, 8)
    assert not any(r.levelname == "ERROR" for r in caplog.records)
    refused = "Error 111 connecting to localhost:1. Connection refused."
    assert [r.getMessage() for r in caplog.records if "not published" in r.getMessage()] == [
        f"job {job.id}: steps 1, 2 not published: {refused}"
    ]


def test_after_a_refused_batch_steps_wait_for_the_end_of_the_job(
    store: JobStore, keys: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    # An outage must not cost every step its retries: one try while the job runs, one at
    # its end.
    job = running(store, keys)
    unreachable = JobStore(redis.Redis(port=1, retry=Retry(NoBackoff(), 0)))
    with StepReporter(unreachable, job, interval=0) as on_step:
        for step in range(1, 5):
            on_step(step, 4)
    refused = "Error 111 connecting to localhost:1. Connection refused."
    assert [r.getMessage() for r in caplog.records if "not published" in r.getMessage()] == [
        f"job {job.id}: steps 1 not published: {refused}",
        f"job {job.id}: steps 2, 3, 4 not published: {refused}",
    ]


def test_steps_go_out_in_batches_at_most_an_interval_apart(
    store: JobStore, keys: KeyStore, rclient: redis.Redis
) -> None:
    job = running(store, keys)
    with StepReporter(store, job, interval=0.1) as on_step:
        for step in range(1, 9):
            on_step(step, 8)
            if step == 4:
                # Four quick steps are held: nothing in the store yet.
                assert store.get(job.id).progress is None
                time.sleep(0.11)
        # Step 5 came 0.1 s after the start: it sent steps 1-5; 6-8 are held.
        assert store.get(job.id).progress == {"step": 5, "total": 8}
    assert store.get(job.id).progress == {"step": 8, "total": 8}


def test_a_cancel_learnt_when_the_block_ends_skips_what_follows(
    store: JobStore, keys: KeyStore
) -> None:
    job = running(store, keys)
    with pytest.raises(Canceled), StepReporter(store, job) as on_step:
        on_step(1, 8)  # held: the interval has not passed
        store.cancel(job)
    assert store.get(job.id).status is JobStatus.CANCELED
