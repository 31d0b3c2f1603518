"""The job store down for longer than its clients' retries, while a job runs, with RabbitMQ as
broker: once it is back, the running job and one queued behind it end (succeeded, or failed
and refunded), each charged once, and the worker lives through it. A Valkey, a worker and an
API of its own, so the store can be stopped and restarted on its data dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from common.apikeys import KeyStore
from common.redis import connect
from common.storage import S3Storage
from producer.servers import free_port, valkey_argv
from tests.support import ROOT, spawn, stop, wait_until

BROKER = os.environ.get("SDQ_TEST_BROKER", "")
pytestmark = [
    pytest.mark.skipif(
        not BROKER.startswith("amqp"),
        reason="needs RabbitMQ as broker: SDQ_TEST_BROKER=amqp://guest:guest@127.0.0.1:5672//",
    ),
    pytest.mark.timeout(240),
]

#: Outages longer than the store clients ride out (20 retries, backoff capped at 2 s: about
#: 33 s). A worker's calls meet the outage one after the other, each riding out its retries:
#: in the first, the running job's one progress batch that Redis refuses takes them, and its
#: terminal write rides out the rest. The second outlasts the refused batch, the last batch
#: (sent when the steps end) and part of the terminal write: the job's lease ran out long
#: before, so on the restart the reconciler may requeue it before that write lands, and the
#: job then runs again from its message (attempts 2, the same image keys).
SHORT_OUTAGE = 40.0
LONG_OUTAGE = 80.0
#: From the store's restart to both jobs' end: a pending retry, the requeued message, the
#: lease (5 s) and a reconciler round, then the two jobs on two shared cores.
DONE_WITHIN = 90.0
LEASE_SECONDS = 5
#: A job of some seconds on the tiny model (budget: at most 30 steps), one credit.
SLOW_JOB = {"prompt": "a slow kite", "tier": "budget", "steps": 30, "width": 128, "height": 128}
QUEUED_JOB = {**SLOW_JOB, "prompt": "a kite behind it"}
CREDITS = 10
TERMINAL = ("succeeded", "failed", "canceled")


@dataclass
class Valkey:
    port: int
    data: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = spawn(valkey_argv(self.port, self.data), self.log)
        probe = redis.Redis.from_url(self.url)
        wait_until(lambda: bool(probe.ping()), 20, "valkey", self.proc, self.log)
        probe.close()

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)


@dataclass
class Stack:
    url: str
    valkey: Valkey
    keys: KeyStore
    worker: subprocess.Popen[bytes]
    worker_log: Path
    api: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def stack(env: dict[str, str], workdir: Path, storage: S3Storage) -> Iterator[Stack]:
    from kombu import Connection

    from common.tiers import load_tiers

    data = workdir / "valkey-outage"
    data.mkdir()
    valkey = Valkey(free_port(), data, workdir / "valkey-outage.log")
    prefix = f"sdqoutage-{uuid.uuid4().hex[:8]}"
    tiers_file = workdir / "tiers-outage.toml"
    builtin = (ROOT / "common" / "tiers.toml").read_text()
    tiers_file.write_text(builtin.replace('queue = "sdq.', f'queue = "{prefix}.'))
    overrides = {
        "SDQ_REDIS_URL": valkey.url,
        "SDQ_BROKER_URL": BROKER,
        "SDQ_TIERS_FILE": str(tiers_file),
        "SDQ_LEASE_SECONDS": str(LEASE_SECONDS),
        "SDQ_RECONCILE_INTERVAL_SECONDS": "1",
        "SDQ_WEBHOOK_DISPATCHER": "0",
    }
    child_env = {**env, **overrides}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        valkey.start()
        worker_log = workdir / "worker-outage.log"
        argv = [sys.executable, "-m", "producer.cli", "worker", "--tier", "budget"]
        worker = spawn([*argv, "--name", f"{prefix}@%h"], worker_log, child_env)
        procs.append(worker)
        port = free_port()
        api_log = workdir / "api-outage.log"
        argv = [sys.executable, "-m", "producer.cli", "api", "--port", str(port)]
        api = spawn(argv, api_log, child_env)
        procs.append(api)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "api", api, api_log)
        wait_until(
            lambda: "ready." in worker_log.read_text(errors="replace"),
            90,
            "worker",
            worker,
            worker_log,
        )
        yield Stack(url, valkey, KeyStore(connect(valkey.url)), worker, worker_log, api)
    finally:
        for proc in procs:
            stop(proc)
        if valkey.proc is not None:
            stop(valkey.proc)
        with Connection(BROKER) as conn:
            channel = conn.channel()
            for tier in load_tiers(tiers_file):
                channel.queue_delete(tier.queue)


def get_job(url: str, key: str, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": key}, timeout=20)
    assert response.status_code == 200, response.text
    return dict(response.json())


def credits(url: str, key: str) -> int:
    response = httpx.get(f"{url}/v1/account", headers={"Authorization": key}, timeout=20)
    assert response.status_code == 200, response.text
    return int(response.json()["credits"])


def submit(url: str, key: str, body: dict[str, Any]) -> str:
    response = httpx.post(f"{url}/v1/jobs", json=body, headers={"Authorization": key}, timeout=15)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def check_ended(job: dict[str, Any], storage: S3Storage) -> int:
    """Asserts ``job`` ended consistently; returns the credits it kept."""
    assert job["status"] in ("succeeded", "failed"), job
    if job["status"] == "failed":
        assert job["refunded"], job
        return 0
    assert not job["refunded"], job
    (image,) = job["images"]
    blob = storage.get(image["key"])
    assert blob.metadata["job-id"] == job["id"]
    assert len(blob.body) == image["size_bytes"]
    return int(job["cost"])


@pytest.mark.parametrize("outage", [SHORT_OUTAGE, LONG_OUTAGE], ids=["40s", "80s"])
def test_jobs_end_once_the_store_is_back_after_an_outage(
    stack: Stack, storage: S3Storage, outage: float
) -> None:
    raw, _ = stack.keys.create(CREDITS, name="outage")
    running_id = submit(stack.url, raw, SLOW_JOB)
    deadline = time.monotonic() + 30
    while (job := get_job(stack.url, raw, running_id))["progress"] is None:
        assert job["status"] in ("queued", "running"), job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "running", job
    queued_id = submit(stack.url, raw, QUEUED_JOB)
    assert get_job(stack.url, raw, queued_id)["status"] == "queued"
    assert credits(stack.url, raw) == CREDITS - 2  # budget: one credit an image

    stack.valkey.kill()
    time.sleep(outage)
    assert stack.worker.poll() is None, "the worker died while the store was down"
    stack.valkey.start()
    restarted = time.monotonic()

    ended: dict[str, float] = {}
    jobs: dict[str, dict[str, Any]] = {}
    while len(ended) < 2:
        for job_id in (running_id, queued_id):
            if job_id in ended:
                continue
            job = get_job(stack.url, raw, job_id)
            if job["status"] in TERMINAL:
                ended[job_id] = time.monotonic() - restarted
                jobs[job_id] = job
        assert time.monotonic() - restarted < DONE_WITHIN, {
            job_id: get_job(stack.url, raw, job_id)["status"] for job_id in (running_id, queued_id)
        }
        time.sleep(0.2)
    for name, job_id in (("running", running_id), ("queued", queued_id)):
        job = jobs[job_id]
        print(
            f"\n{name} job {job_id}: {job['status']} {ended[job_id]:.1f}s after the store's "
            f"restart ({outage:.0f}s outage), attempts {job['attempts']}, error {job['error']!r}"
        )

    kept = sum(check_ended(jobs[job_id], storage) for job_id in (running_id, queued_id))
    assert credits(stack.url, raw) == CREDITS - kept
    assert stack.worker.poll() is None, "the worker died"
    assert stack.api.poll() is None, "the API died"
    time.sleep(2 * LEASE_SECONDS)  # nothing runs them again
    for job_id in (running_id, queued_id):
        assert get_job(stack.url, raw, job_id)["status"] == jobs[job_id]["status"]
    assert credits(stack.url, raw) == CREDITS - kept
