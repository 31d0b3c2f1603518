"""Retention (issue 17) against the real stack: `DELETE /v1/jobs/{id}` takes a job's record
and its objects at once (its presigned URLs stop working), refunds a queued or running job
once, and is 404 to another key; without a delete, a succeeded job's images go
`SDQ_IMAGE_TTL_SECONDS` after it ended (its record stays readable) and a failed or canceled
job's objects at once. What is checked is what a user sees: status codes and messages, the
objects in the bucket, the key's credits."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.apikeys import KeyStore
from common.redis import connect
from common.settings import Settings
from common.storage import S3Storage, job_prefix
from common.store import JobStore
from producer.servers import free_port
from tests.e2e.api_calls import b64, credits, picture
from tests.support import spawn, stop, wait_until

Key = Callable[..., str]
#: Holds the session worker's only child for a while: what is sent behind it stays queued.
SLOW = {"prompt": "a slow one", "tier": "normal", "steps": 50}
TTL = 5


def call(url: str, method: str, path: str, key: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{url}{path}", headers={"Authorization": key}, timeout=30, **kw)


def submit(url: str, key: str, **body: Any) -> dict[str, Any]:
    response = call(
        url,
        "POST",
        "/v1/jobs",
        key,
        json={"prompt": "a lighthouse", "tier": "budget", "steps": 1, **body},
    )
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def status_of(url: str, key: str, job_id: str) -> str:
    status: str = call(url, "GET", f"/v1/jobs/{job_id}", key).json()["status"]
    return status


def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {what}")


def ended(url: str, key: str, job_id: str, timeout: float = 45) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def done() -> bool:
        found.update(call(url, "GET", f"/v1/jobs/{job_id}", key).json())
        return found["status"] in ("succeeded", "failed", "canceled")

    until(done, timeout, f"job {job_id} ended")
    return found


def no_objects(storage: S3Storage, settings: Settings, job_id: str) -> bool:
    return objects(storage, settings, job_id) == []


def last_event(url: str, key: str, job_id: str) -> str:
    """The last ``event:`` line of the job's event stream, once it ends."""
    last = ""
    headers = {"Authorization": key}
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=headers, timeout=20) as got:
        for line in got.iter_lines():
            if line.startswith("event:"):
                last = line
    return last


def objects(storage: S3Storage, settings: Settings, job_id: str) -> list[str]:
    """Every object under the job's prefix, as the bucket lists them."""
    listed = storage.client.list_objects_v2(
        Bucket=storage.bucket, Prefix=job_prefix(settings.s3_prefix, job_id)
    )
    return sorted(item["Key"] for item in listed.get("Contents", []))


def gone(url: str) -> bool:
    """A presigned URL that no longer serves its object."""
    return httpx.get(url, timeout=30).status_code in (403, 404)


@pytest.fixture
def slow(api_url: str, new_key: Key) -> Iterator[tuple[str, str]]:
    """A slow job running on the session worker's only child (key, job id); canceled at the
    end if still running."""
    key = new_key(100)
    job = submit(api_url, key, **SLOW)
    until(lambda: status_of(api_url, key, job["id"]) == "running", 45, "the slow job ran")
    yield key, job["id"]
    call(api_url, "POST", f"/v1/jobs/{job['id']}/cancel", key)


def test_delete_takes_the_record_and_the_images_at_once(
    api_url: str, new_key: Key, storage: S3Storage, settings: Settings
) -> None:
    owner, stranger = new_key(10), new_key(10)
    job = ended(api_url, owner, submit(api_url, owner, num_images=2)["id"])
    assert job["status"] == "succeeded", job
    stored = objects(storage, settings, job["id"])
    assert stored == sorted(image["key"] for image in job["images"]) and len(stored) == 2
    urls = [image["url"] for image in job["images"]]
    assert all(httpx.get(u, timeout=30).status_code == 200 for u in urls)

    # Another key's job is as absent as a missing one: nothing deleted.
    refused = call(api_url, "DELETE", f"/v1/jobs/{job['id']}", stranger)
    assert refused.status_code == 404
    assert refused.json() == {"code": 404, "message": f"no job {job['id']}"}
    assert objects(storage, settings, job["id"]) == stored
    assert call(api_url, "GET", f"/v1/jobs/{job['id']}", owner).status_code == 200

    deleted = call(api_url, "DELETE", f"/v1/jobs/{job['id']}", owner)
    assert deleted.status_code == 204 and deleted.content == b""
    after = call(api_url, "GET", f"/v1/jobs/{job['id']}", owner)
    assert after.status_code == 404
    assert after.json() == {"code": 404, "message": f"no job {job['id']}"}
    assert objects(storage, settings, job["id"]) == []
    assert all(gone(u) for u in urls)
    assert job["id"] not in [
        j["id"] for j in call(api_url, "GET", "/v1/jobs", owner).json()["jobs"]
    ]
    # Deleted once: again is 404, and deleting charged nothing.
    again = call(api_url, "DELETE", f"/v1/jobs/{job['id']}", owner)
    assert again.status_code == 404
    assert again.json() == {"code": 404, "message": f"no job {job['id']}"}
    assert credits(api_url, owner) == 10 - job["cost"]


def test_deleting_a_queued_or_running_job_refunds_it_once(
    api_url: str, new_key: Key, storage: S3Storage, settings: Settings
) -> None:
    key = new_key(100)
    running = submit(api_url, key, **SLOW)
    until(lambda: status_of(api_url, key, running["id"]) == "running", 45, "the slow job ran")
    queued = submit(api_url, key, prompt="behind the slow one", tier="normal")
    assert status_of(api_url, key, queued["id"]) == "queued"
    charged = credits(api_url, key)
    assert charged == 100 - running["cost"] - queued["cost"]

    # A client following the running job sees it end canceled when it is deleted.
    with ThreadPoolExecutor(1) as pool:
        followed = pool.submit(last_event, api_url, key, running["id"])
        time.sleep(0.5)
        for job in (queued, running):
            response = call(api_url, "DELETE", f"/v1/jobs/{job['id']}", key)
            assert response.status_code == 204, response.text
        assert followed.result(timeout=20) == "event: job.canceled"
    for job in (queued, running):
        assert call(api_url, "GET", f"/v1/jobs/{job['id']}", key).status_code == 404
    assert credits(api_url, key) == 100

    # The worker stops the deleted run at its next step and keeps nothing of it: no second
    # refund, no record brought back, no object left behind.
    time.sleep(3)
    assert credits(api_url, key) == 100
    for job in (queued, running):
        assert call(api_url, "GET", f"/v1/jobs/{job['id']}", key).status_code == 404
        assert call(api_url, "DELETE", f"/v1/jobs/{job['id']}", key).status_code == 404
        assert objects(storage, settings, job["id"]) == []
    assert credits(api_url, key) == 100


def test_a_canceled_or_failed_jobs_input_goes_at_once(
    api_url: str,
    new_key: Key,
    storage: S3Storage,
    settings: Settings,
    store: JobStore,
    slow: tuple[str, str],
) -> None:
    key = new_key(10)
    sent = b64(picture(64, 64))
    canceled = submit(api_url, key, init_image=sent, strength=0.5)
    failed = submit(api_url, key, init_image=sent, strength=0.5)
    for job in (canceled, failed):
        assert objects(storage, settings, job["id"]) == [job["init_image_key"]]
        assert status_of(api_url, key, job["id"]) == "queued"

    response = call(api_url, "POST", f"/v1/jobs/{canceled['id']}/cancel", key)
    assert response.status_code == 200, response.text
    # As the reconciler fails a job it gives up on.
    assert store.fail(store.get(failed["id"]), "gave up").applied
    for job_id in (canceled["id"], failed["id"]):
        until(partial(no_objects, storage, settings, job_id), 15, f"{job_id}'s input deleted")
    # The records stay: only the objects go.
    assert status_of(api_url, key, canceled["id"]) == "canceled"
    assert status_of(api_url, key, failed["id"]) == "failed"
    assert credits(api_url, key) == 10


@dataclass
class Stack:
    url: str
    keys: KeyStore


@pytest.fixture(scope="module")
def short_ttl(
    env: dict[str, str], workdir: Path, redis_url: str, storage: S3Storage
) -> Iterator[Stack]:
    """An API and a worker of their own with SDQ_IMAGE_TTL_SECONDS=5, on a database of their
    own: the reconciler's leader sweeps with its own TTL, and the session API would lead on
    the session's database."""
    url_db = redis_url.rsplit("/", 1)[0] + "/7"
    client = connect(url_db)
    client.flushdb()
    values = {k: v for k, v in env.items() if k not in ("SDQ_BROKER_URL", "SDQ_TIERS_FILE")} | {
        "SDQ_REDIS_URL": url_db,
        "SDQ_IMAGE_TTL_SECONDS": str(TTL),
        "SDQ_RECONCILE_INTERVAL_SECONDS": "0.5",
    }
    worker_log = workdir / "worker-ttl.log"
    argv = [sys.executable, "-m", "producer.cli", "worker", "--tier", "budget"]
    worker = spawn(argv, worker_log, values)
    port = free_port()
    api_log = workdir / "api-ttl.log"
    api = spawn([sys.executable, "-m", "producer.cli", "api", "--port", str(port)], api_log, values)
    procs: list[subprocess.Popen[bytes]] = [worker, api]
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "api", api, api_log)
        wait_until(
            lambda: "ready." in worker_log.read_text(errors="replace"),
            90,
            "ttl worker",
            worker,
            worker_log,
        )
        yield Stack(url, KeyStore(client))
    finally:
        for proc in procs:
            stop(proc)
        client.flushdb()


def test_a_succeeded_jobs_images_go_after_the_ttl(
    short_ttl: Stack, storage: S3Storage, settings: Settings
) -> None:
    key, _ = short_ttl.keys.create(10, name="ttl")
    job = ended(short_ttl.url, key, submit(short_ttl.url, key, num_images=2)["id"])
    assert job["status"] == "succeeded", job
    stored = objects(storage, settings, job["id"])
    assert stored == sorted(image["key"] for image in job["images"]) and len(stored) == 2
    url = job["images"][0]["url"]
    assert httpx.get(url, timeout=30).status_code == 200
    assert job["images_expire_at"] == pytest.approx(job["finished_at"] + TTL)

    # Gone within a few rounds of the TTL, and not before it: polled, the first listing
    # that finds nothing is at least TTL after the job ended.
    deadline = time.monotonic() + TTL + 15
    while objects(storage, settings, job["id"]):
        assert time.monotonic() < deadline, "the images outlived their TTL"
        time.sleep(0.2)
    assert time.time() >= job["finished_at"] + TTL - 0.5
    assert gone(url)
    # The record stays readable, and says what it was.
    after = call(short_ttl.url, "GET", f"/v1/jobs/{job['id']}", key)
    assert after.status_code == 200 and after.json()["status"] == "succeeded"
    assert [i["sha256"] for i in after.json()["images"]] == [i["sha256"] for i in job["images"]]
    # ...and hands out no URL for what is gone.
    assert [i["url"] for i in after.json()["images"]] == [None, None]
    assert after.json()["images_expire_at"] == job["images_expire_at"]
