"""The rest of /v1 through the Python client: listing, cancel, SSE, batches, idempotency,
priority."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from common.apikeys import KeyStore
from common.job import JobRequest, JobStatus
from common.storage import S3Storage
from producer.client import (
    AuthenticationError,
    Client,
    ConflictError,
    InsufficientCreditsError,
    InvalidRequestError,
    NotFoundError,
)

Key = Callable[..., str]
# 50 steps keep the worker busy for a couple of seconds with the tiny model.
SLOW = {"prompt": "a slow one", "tier": "normal", "steps": 50}


@pytest.fixture
def client(api_url: str, new_key: Key) -> Iterator[Client]:
    with Client(api_url, new_key(1000)) as client:
        yield client


def started(client: Client, job_id: str) -> None:
    for event in client.events(job_id):
        if event.type in ("job.started", "job.progress"):
            return
    raise AssertionError("the job ended before it started")


def test_events_from_submit_to_terminal(client: Client) -> None:
    job = client.submit(prompt="a comet", tier="budget", steps=3)
    events = list(client.events(job.id))
    types = [e.type for e in events]
    assert types == ["job.queued", "job.started", *["job.progress"] * 3, "job.succeeded"]
    assert [e.data["progress"]["step"] for e in events if e.type == "job.progress"] == [1, 2, 3]
    assert [e.seq for e in events if e.seq is not None] == [1, 2, 3]
    assert events[-1].data["images"][0]["sha256"]
    replay = list(client.events(job.id, last_event_id=2))
    assert [e.type for e in replay] == ["job.succeeded"]


def test_list_pages_and_filters(client: Client) -> None:
    ids = [client.submit(prompt=f"p{i}", tier="budget", steps=1).id for i in range(5)]
    for job_id in ids:
        client.wait(job_id)
    canceled = client.submit(**SLOW)
    queued = client.submit(prompt="behind the slow one", tier="normal", steps=1)
    client.cancel(queued.id)
    first = client.jobs(limit=3)
    assert [j.id for j in first.jobs] == [queued.id, canceled.id, ids[4]]
    second = client.jobs(limit=3, cursor=first.next_cursor or 0)
    assert [j.id for j in second.jobs] == [ids[3], ids[2], ids[1]]
    only = client.jobs(status="canceled")
    assert [j.id for j in only.jobs] == [queued.id] and only.next_cursor is None
    client.cancel(canceled.id)


def test_cancel_a_queued_job(client: Client, keys: KeyStore) -> None:
    blocker = client.submit(**SLOW)
    job = client.submit(prompt="never", tier="normal", steps=2)
    before = client.account().credits
    canceled = client.cancel(job.id)
    assert canceled.status is JobStatus.CANCELED and canceled.refunded
    assert client.account().credits == before + 2
    with pytest.raises(ConflictError, match="is already canceled"):
        client.cancel(job.id)
    client.wait(blocker.id)
    time.sleep(0.5)  # the worker drops it when it comes up
    assert [e.type for e in client.events(job.id)] == ["job.queued", "job.canceled"]
    assert client.account().credits == before + 2


def test_cancel_a_running_job_stops_it(client: Client, storage: S3Storage) -> None:
    job = client.submit(**SLOW)
    started(client, job.id)
    before = client.account().credits
    client.cancel(job.id)
    events = list(client.events(job.id))
    assert events[-1].type == "job.canceled"
    time.sleep(0.5)
    final = client.get(job.id)
    assert final.status is JobStatus.CANCELED and final.images == []
    steps = [e.data["progress"]["step"] for e in events if e.type == "job.progress"]
    assert not steps or max(steps) < 50
    assert client.account().credits == before + 2
    with pytest.raises(Exception, match="no object"):
        storage.get(f"images/{job.id}/0.jpg")


def test_a_batch_of_20(client: Client) -> None:
    requests = [JobRequest(prompt=f"tile {i}", tier="budget", steps=1, seed=i) for i in range(20)]
    before = client.account().credits
    batch = client.batch(requests)
    assert batch.total == 20 and batch.credits_left == before - 20
    deadline = time.monotonic() + 120
    while not (batch := client.get_batch(batch.id)).done:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert batch.counts["succeeded"] == 20
    assert sorted(job.seed for job in batch.jobs) == list(range(20))
    assert all(job.batch_id == batch.id for job in batch.jobs)


def test_a_batch_is_all_or_nothing(api_url: str, new_key: Key) -> None:
    with Client(api_url, new_key(5)) as client:
        requests = [JobRequest(prompt="x", tier="normal", steps=1)] * 3  # costs 6
        with pytest.raises(InsufficientCreditsError, match="costs 6, the key has 5"):
            client.batch(requests)
        assert client.account().credits == 5 and client.jobs().jobs == []


def test_idempotent_retries_charge_once(client: Client) -> None:
    before = client.account().credits
    request = JobRequest(prompt="once", tier="budget", steps=1)
    first = client.submit(request, idempotency_key="retry-1")
    again = client.submit(request, idempotency_key="retry-1")
    assert again.id == first.id
    assert client.account().credits == before - 1
    with pytest.raises(ConflictError, match="already used with a different request"):
        client.submit(prompt="another", tier="budget", idempotency_key="retry-1")
    response = client.http.post(
        "/v1/jobs", json=request.model_dump(mode="json"), headers={"Idempotency-Key": "retry-1"}
    )
    assert response.headers["idempotent-replayed"] == "true"
    assert client.account().credits == before - 1


def test_idempotent_hotpot_requests(api_url: str, new_key: Key) -> None:
    key = new_key(10)
    headers = {"Authorization": key, "Idempotency-Key": "hotpot-1"}
    fields = {"inputText": (None, "x"), "steps": (None, "1")}
    url = f"{api_url}/stable-diffusion-budget"
    first = httpx.post(url, headers=headers, files=fields, timeout=60)
    second = httpx.post(url, headers=headers, files=fields, timeout=60)
    assert first.headers["x-job-id"] == second.headers["x-job-id"]
    assert first.content == second.content
    assert second.headers["x-api-credits-left"] == "9"


def test_priority_jumps_the_queue(client: Client) -> None:
    blocker = client.submit(**SLOW)
    started(client, blocker.id)
    low = [client.submit(prompt="low", tier="normal", steps=1, priority=0).id for _ in range(4)]
    high = client.submit(prompt="high", tier="normal", steps=1, priority=9).id
    for job_id in [*low, high]:
        client.wait(job_id)
    started_at = {job_id: client.get(job_id).started_at or 0 for job_id in [*low, high]}
    assert started_at[high] < min(started_at[j] for j in low), started_at


def test_typed_errors(api_url: str, new_key: Key) -> None:
    with Client(api_url, "sdq_nope") as bad, pytest.raises(AuthenticationError) as info:
        bad.account()
    assert info.value.status_code == 403
    with Client(api_url, new_key()) as client:
        with pytest.raises(NotFoundError):
            client.get("job_missing")
        with pytest.raises(InvalidRequestError, match="steps must be at most 30 on tier budget"):
            client.submit(prompt="x", tier="budget", steps=31)


def test_another_key_cannot_touch_my_job(api_url: str, new_key: Key) -> None:
    with Client(api_url, new_key()) as mine, Client(api_url, new_key()) as theirs:
        job = mine.submit(prompt="mine", tier="budget", steps=1)
        for call in (theirs.get, theirs.cancel, theirs.redeliver, lambda i: list(theirs.events(i))):
            with pytest.raises(NotFoundError):
                call(job.id)
        assert theirs.jobs().jobs == []


def test_concurrent_cancel_and_finish_refund_at_most_once(client: Client) -> None:
    jobs = [client.submit(prompt="race", tier="budget", steps=1) for _ in range(6)]
    before = client.account().credits
    threads = [threading.Thread(target=lambda j=j: _try_cancel(client, j.id)) for j in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = [client.wait(job.id) for job in jobs]
    refunds = sum(1 for job in final if job.status is JobStatus.CANCELED)
    assert all(job.refunded == (job.status is JobStatus.CANCELED) for job in final)
    assert client.account().credits == before + refunds


def _try_cancel(client: Client, job_id: str) -> None:
    with contextlib.suppress(ConflictError):
        client.cancel(job_id)
