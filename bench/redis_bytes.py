"""Redis bytes per job: how much ``used_memory`` grows for each finished job the store keeps.

It starts its own Valkey on a free loopback port and drives the job store's public methods
the way a worker does, with no broker, workers or S3: ``JobStore.create``, ``start``, one
``progress`` call per denoising step and ``succeed``. Two modes: no webhooks, and a webhook
on every status event plus ``job.progress`` (so deliveries are scheduled and stay pending,
as nothing sends them) with 200 bytes of metadata. It prints one line:

    redis bytes per job: 5120 without webhooks, 18034 with webhooks (1000 jobs, 64x64, 4 steps)

Only public methods are used, so the same script measures older code too: run it with
``PYTHONPATH`` pointing at another checkout (the modules it measured are named on stderr).

    python bench/redis_bytes.py [--jobs 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("PYTHONPATH"):
    # PYTHONPATH, when set, names the checkout to measure; otherwise this one.
    sys.path.insert(0, str(ROOT))

import common.store  # noqa: E402
from common.apikeys import KeyStore  # noqa: E402
from common.job import (  # noqa: E402  # noqa: E402
    ALL_EVENTS,
    DEFAULT_WEBHOOK_EVENTS,
    ImageResult,
    Job,
    JobRequest,
    JobStatus,
    new_job_id,
    now,
)
from common.store import JobStore  # noqa: E402
from producer.servers import free_port, valkey_argv  # noqa: E402

STEPS = 4
SIZE = 64
WARMUP = 20  # jobs run before the first reading: scripts cached, metric fields created


def make_job(key_id: str, index: int, webhooks: bool) -> Job:
    fields: dict[str, Any] = {
        "prompt": f"a red kite {index}",
        "tier": "budget",
        "steps": STEPS,
        "width": SIZE,
        "height": SIZE,
        "seed": index,
    }
    if webhooks:
        events = list(dict.fromkeys([*DEFAULT_WEBHOOK_EVENTS, *ALL_EVENTS]))
        fields["webhook_url"] = "https://hooks.example.com/sdq"
        fields["webhook_events"] = events
        fields["metadata"] = {"note": "x" * 188}  # 200 bytes as JSON: {"note": "x..."}
    request = JobRequest.model_validate(fields)
    return Job(
        id=new_job_id(),
        key_id=key_id,
        tier=request.tier,
        status=JobStatus.QUEUED,
        request=request,
        seed=index,
        steps=STEPS,
        cost=1,
        created_at=now(),
    )


def run_job(store: JobStore, job: Job) -> None:
    store.create([job])
    store.start(job.id)
    for step in range(1, STEPS + 1):
        store.progress(job, [(step, STEPS, now())])
    image = ImageResult(
        index=0,
        key=f"images/{job.id}/0.jpg",
        content_type="image/jpeg",
        size_bytes=1234,
        sha256="0" * 64,
        seed=job.seed,
        width=SIZE,
        height=SIZE,
    )
    store.succeed(job, [image], backend="local", model="tiny")


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def bytes_per_job(client: redis.Redis, jobs: int, webhooks: bool) -> float:
    client.flushall()
    store = JobStore(client)
    _, key = KeyStore(client).create(10 * (jobs + WARMUP), name="redis-bytes")
    for index in range(WARMUP):
        run_job(store, make_job(key.id, index, webhooks))
    before = used_memory(client)
    for index in range(WARMUP, WARMUP + jobs):
        run_job(store, make_job(key.id, index, webhooks))
    return (used_memory(client) - before) / jobs


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    print(f"measuring {Path(common.store.__file__).resolve()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="sdq-redis-bytes-") as tmp:
        port = free_port()
        proc = subprocess.Popen(
            valkey_argv(port, Path(tmp)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            client = redis.Redis(port=port, decode_responses=True)
            deadline = time.monotonic() + 20
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            plain = bytes_per_job(client, args.jobs, webhooks=False)
            hooked = bytes_per_job(client, args.jobs, webhooks=True)
        finally:
            proc.terminate()
            proc.wait(10)
    print(
        f"redis bytes per job: {plain:.0f} without webhooks, {hooked:.0f} with webhooks "
        f"({args.jobs} jobs, {SIZE}x{SIZE}, {STEPS} steps)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
