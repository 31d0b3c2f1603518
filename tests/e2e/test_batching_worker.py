"""A real worker with a tier whose ``batch_images`` is 4: four waiting jobs, four messages, one
pipeline call; the spare messages find nothing to run, and every job ends with its image."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from common.apikeys import KeyStore
from common.job import JobStatus
from common.queue import GENERATE_TASK, make_celery
from common.settings import Settings
from common.storage import S3Storage
from common.store import JobStore
from common.tiers import Tiers
from tests.factories import queued_job
from tests.support import ROOT, spawn, stop, wait_until

BATCHED = """
[tiers.batched]
queue = "sdq.batched"
hardware = ["h100"]
default_steps = 3
max_steps = 10
max_side = 512
max_images = 2
price = 1
batch_images = 4
"""


def test_a_worker_runs_waiting_jobs_of_one_shape_in_one_call(
    env: dict[str, str],
    workdir: Path,
    settings: Settings,
    store: JobStore,
    keys: KeyStore,
    storage: S3Storage,
) -> None:
    tiers_file = workdir / "tiers-batched.toml"
    tiers_file.write_text((ROOT / "common" / "tiers.toml").read_text() + BATCHED)
    tiers = Tiers.from_toml(tiers_file.read_text())
    jobs = [
        queued_job(store, keys, tier="batched", prompt=f"kite {n}", seed=n, steps=3)
        for n in range(4)
    ]
    celery = make_celery(settings, tiers)
    for job in jobs:  # what the API's create step sends: one message a job, its id
        celery.send_task(GENERATE_TASK, args=[job.id], task_id=job.id, queue="sdq.batched")
    # The worker starts once all four wait, as a worker finds a backlog.
    log = workdir / "worker-batched.log"
    argv = [sys.executable, "-m", "producer.cli", "worker", "--tier", "batched"]
    proc = spawn(argv, log, {**env, "SDQ_TIERS_FILE": str(tiers_file)})
    try:
        wait_until(lambda: "ready." in log.read_text(errors="replace"), 90, "worker", proc, log)
        deadline = time.monotonic() + 60
        while any(s is not JobStatus.SUCCEEDED for s in store.statuses([j.id for j in jobs])):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        # The spare messages: each finds nothing to run.
        wait_until(
            lambda: log.read_text().count("no job waiting to run") == 3, 30, "spares", proc, log
        )
    finally:
        stop(proc)
    text = log.read_text()
    assert f"job {jobs[0].id}: runs in one call with {', '.join(j.id for j in jobs[1:])}" in text
    for job in jobs:
        done = store.get(job.id)
        assert done.backend == "local" and [image.seed for image in done.images] == [job.seed]
        assert storage.get(done.images[0].key).body[:2] == b"\xff\xd8"
        assert keys.credits(job.key_id) == 10 - job.cost
    counted = store.redis.hgetall("sdq:metrics:sdq_batched_jobs_total")
    assert {json.loads(k)["tier"]: float(v) for k, v in counted.items()}["batched"] == 4
