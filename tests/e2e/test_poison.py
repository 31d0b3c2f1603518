"""A job that kills its worker process every time ends failed after the redelivery cap,
refunded, and the worker stops running it."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.apikeys import KeyStore
from common.job import Job, JobRequest, JobStatus, new_job_id, now
from common.queue import GENERATE_TASK, make_celery
from common.settings import Settings
from common.store import JobStore
from common.tiers import load_tiers
from tests.support import spawn, stop, wait_until

# Loaded by the worker's interpreter at start-up (sitecustomize): prompts containing POISON
# kill the pool child that runs them, as a segfaulting kernel or the OOM killer would.
POISON = """
import os
from workers import pipeline
_generate = pipeline.SdxlRunner.generate
def generate(self, generation, on_step=None):
    if "POISON" in generation.prompt:
        os.kill(os.getpid(), 9)
    return _generate(self, generation, on_step)
pipeline.SdxlRunner.generate = generate
"""


@pytest.fixture(scope="module")
def poison_worker(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, str], str]]:
    home = tmp_path_factory.mktemp("poison")
    (home / "sitecustomize.py").write_text(POISON)
    queue = f"sdq.poison-{uuid.uuid4().hex[:8]}"
    tiers = home / "tiers.toml"
    builtin = (Path(__file__).resolve().parents[2] / "common" / "tiers.toml").read_text()
    # A tier of its own: keys take turns within a tier, so no other worker may run the job.
    own = builtin.replace('queue = "sdq.normal"', f'queue = "{queue}"')
    tiers.write_text(own.replace("[tiers.normal]", "[tiers.poison]"))
    worker_env = {
        **env,
        "PYTHONPATH": str(home),
        "SDQ_TIERS_FILE": str(tiers),
        "SDQ_MAX_DELIVERIES": "2",
    }
    log = home / "worker.log"
    argv = [
        sys.executable,
        "-m",
        "producer.cli",
        "worker",
        "--tier",
        "poison",
        "--name",
        f"poison-{queue}@test",
    ]
    proc = spawn(argv, log, worker_env)
    wait_until(lambda: "ready." in log.read_text(errors="replace"), 90, "poison worker", proc, log)
    yield queue, tiers
    assert proc.poll() is None, "the worker died with its job"
    stop(proc)
    broker = worker_env.get("SDQ_BROKER_URL", "")
    if broker.startswith("amqp"):
        from kombu import Connection

        with Connection(broker) as conn:
            conn.channel().queue_delete(queue)


def test_a_job_that_kills_its_worker_ends_failed_and_refunded(
    poison_worker: tuple[str, Path], store: JobStore, keys: KeyStore, settings: Settings
) -> None:
    queue, tiers = poison_worker
    key = keys.create(10)[1]
    request = JobRequest(prompt="POISON pill", steps=2)
    job = Job(
        id=new_job_id(), key_id=key.id, tier="poison", status=JobStatus.QUEUED,
        request=request, seed=1, steps=2, cost=2, created_at=now(),
    )  # fmt: skip
    store.create([job])
    assert keys.credits(key.id) == 8
    # The worker's tiers, so the queue is declared with the same arguments (RabbitMQ checks).
    celery = make_celery(settings, load_tiers(tiers))
    celery.send_task(GENERATE_TASK, args=[job.id], queue=queue)
    deadline = time.monotonic() + 120
    while (current := store.get(job.id)).status is not JobStatus.FAILED:
        assert time.monotonic() < deadline, current
        time.sleep(0.2)
    assert current.error == "gave up after 2 deliveries: the worker was lost each time"
    assert current.attempts == 3 and current.refunded
    assert keys.credits(key.id) == 10
    time.sleep(3)
    assert store.get(job.id).attempts == 3  # no more deliveries: it does not loop
    celery.close()
