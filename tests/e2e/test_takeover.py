"""A worker killed mid-job is taken over by another within about the lease, not after the
broker's visibility timeout (an hour by default): two workers and an API of their own, with
a 3 s lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.apikeys import KeyStore
from common.redis import connect
from common.storage import S3Storage
from producer.servers import free_port
from tests.support import spawn, stop, wait_until

LEASE_SECONDS = 3
#: From the kill to the job's second start: the lease left (3 s at most), a reconciler
#: round (0.5 s) and the other worker's pickup. The visibility timeout is 3600 s: a job
#: that waited for the broker's redelivery would miss this by an hour.
TAKEOVER_WITHIN = LEASE_SECONDS + 5.0
#: From the kill to the job's success: the takeover, then the whole job again (slow on two
#: shared cores) and its upload.
DONE_WITHIN = 30.0
#: A job of some seconds on the tiny model: long enough to be killed mid-way.
SLOW_JOB = {"prompt": "a slow kite", "tier": "budget", "steps": 30, "width": 128, "height": 128}


@dataclass
class Stack:
    url: str
    keys: KeyStore
    workers: dict[str, tuple[subprocess.Popen[bytes], Path]]


@pytest.fixture(scope="module")
def stack(
    env: dict[str, str], workdir: Path, redis_url: str, storage: S3Storage
) -> Iterator[Stack]:
    db = redis_url.rsplit("/", 1)[0] + "/8"
    client = connect(db)
    client.flushdb()
    overrides = {
        "SDQ_REDIS_URL": db,
        "SDQ_BROKER_URL": db,
        "SDQ_LEASE_SECONDS": str(LEASE_SECONDS),
        "SDQ_RECONCILE_INTERVAL_SECONDS": "0.5",
        "SDQ_WEBHOOK_DISPATCHER": "0",
    }
    assert "SDQ_VISIBILITY_TIMEOUT_SECONDS" not in env  # the default, 3600 s
    child_env = {**env, **overrides}
    procs: list[subprocess.Popen[bytes]] = []
    workers = {}
    try:
        for name in ("a", "b"):
            log = workdir / f"worker-takeover-{name}.log"
            argv = [sys.executable, "-m", "producer.cli", "worker", "--tier", "budget"]
            proc = spawn([*argv, "--name", f"takeover-{name}@%h"], log, child_env)
            procs.append(proc)
            workers[name] = (proc, log)
        port = free_port()
        api_log = workdir / "api-takeover.log"
        argv = [sys.executable, "-m", "producer.cli", "api", "--port", str(port)]
        api = spawn(argv, api_log, child_env)
        procs.append(api)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "api", api, api_log)
        for proc, log in workers.values():
            wait_until(partial(ready, log), 90, "worker", proc, log)
        yield Stack(url, KeyStore(client), workers)
    finally:
        for proc in procs:
            stop(proc)
        client.flushdb()


def ready(log: Path) -> bool:
    return "ready." in log.read_text(errors="replace")


def get_job(url: str, key: str, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": key}, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def credits(url: str, key: str) -> int:
    response = httpx.get(f"{url}/v1/account", headers={"Authorization": key}, timeout=10)
    assert response.status_code == 200, response.text
    return int(response.json()["credits"])


def runs(log: Path, job_id: str, attempt: int) -> bool:
    return f"job {job_id}: attempt {attempt} on tier" in log.read_text(errors="replace")


def test_a_killed_worker_is_taken_over_within_the_lease(stack: Stack, storage: S3Storage) -> None:
    raw, _ = stack.keys.create(10, name="takeover")
    response = httpx.post(
        f"{stack.url}/v1/jobs", json=SLOW_JOB, headers={"Authorization": raw}, timeout=15
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert credits(stack.url, raw) == 9  # budget: one credit an image

    # Which worker runs it: its log says so once it started.
    deadline = time.monotonic() + 20
    running = None
    while running is None:
        assert time.monotonic() < deadline, get_job(stack.url, raw, job_id)
        for name, (_, log) in stack.workers.items():
            if runs(log, job_id, 1):
                running = name
        time.sleep(0.05)
    while (job := get_job(stack.url, raw, job_id))["progress"] is None:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "running" and job["attempts"] == 1, job

    proc, _ = stack.workers[running]
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its pool child, mid-job
    proc.wait(5)
    killed = time.monotonic()

    while (job := get_job(stack.url, raw, job_id))["attempts"] < 2:
        assert job["status"] in ("running", "queued"), job  # queued: requeued, not yet taken
        assert time.monotonic() - killed < TAKEOVER_WITHIN, job
        time.sleep(0.1)
    took_over = time.monotonic() - killed
    while (job := get_job(stack.url, raw, job_id))["status"] == "running":
        assert time.monotonic() - killed < DONE_WITHIN, job
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2, job
    assert took_over < TAKEOVER_WITHIN
    (other,) = [name for name in stack.workers if name != running]
    assert runs(stack.workers[other][1], job_id, 2)
    (image,) = job["images"]
    blob = storage.get(image["key"])
    assert blob.metadata["job-id"] == job_id
    assert len(blob.body) == image["size_bytes"]
    assert credits(stack.url, raw) == 9  # charged once, never refunded
    assert not job["refunded"]
