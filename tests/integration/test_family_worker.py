"""`sdq worker --model M`: a worker serves its tiers' queues of one model, loads that model
only, and refuses a tier that does not serve it."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from common.apikeys import KeyStore
from common.job import Job, JobRequest, JobStatus, new_job_id, now
from common.queue import GENERATE_TASK, make_celery
from common.settings import Settings
from common.storage import S3Storage
from common.store import JobStore
from common.tiers import load_tiers
from workers.main import run_worker

ROOT = Path(__file__).resolve().parents[2]


def worker_refusal(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    env.update(SDQ_ENV="development", SDQ_HOME=str(tmp_path))
    argv = [sys.executable, "-m", "producer.cli", "worker", *args]
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--tier", "premium", "--model", "sd15"],
            "sdq worker: tier premium does not serve model 'sd15'; it serves: sdxl",
        ),
        (
            ["--tier", "budget", "--tier", "art", "--model", "sd21"],
            "sdq worker: tier art does not serve model 'sd21'; it serves: sdxl",
        ),
        (
            ["--tier", "budget", "--model", "sd9"],
            "sdq worker: unknown model 'sd9'; choose one of: sdxl, sd15, sd21",
        ),
    ],
)
def test_the_worker_refuses_a_tier_that_does_not_serve_its_model(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = worker_refusal(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == message


def test_run_worker_refuses_before_it_loads_anything(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run_worker(["normal", "premium"], model="sd21")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == "sdq worker: tier premium does not serve model 'sd21'; it serves: sdxl\n"


def test_an_sd15_job_runs_on_the_sd15_worker(
    sd15_worker: subprocess.Popen[bytes],
    settings: Settings,
    store: JobStore,
    keys: KeyStore,
    storage: S3Storage,
) -> None:
    """The job waits in its lane (budget.sd15), its message goes to the pair's queue, and
    the worker of that pair runs it on the tiny SD 1.5 pipeline."""
    tiers = load_tiers(settings.tiers_file)
    budget = tiers.get("budget")
    request = JobRequest(prompt="a red kite", tier="budget", model="sd15", width=64, height=64)
    job = Job(
        id=new_job_id(), key_id=keys.create(10)[1].id, tier="budget", status=JobStatus.QUEUED,
        request=request, seed=5, steps=2, cost=1, created_at=now(), model_id="sd15",
        lane=budget.lane("sd15"),
    )  # fmt: skip
    store.create([job])
    celery = make_celery(settings, tiers)
    try:
        celery.send_task(
            GENERATE_TASK, args=[job.id], task_id=job.id, queue=budget.queue_for("sd15")
        )
        deadline = time.monotonic() + 60
        while not (current := store.get(job.id)).status.terminal:
            assert time.monotonic() < deadline, current
            time.sleep(0.2)
    finally:
        celery.close()
    assert current.status is JobStatus.SUCCEEDED, current.error
    assert current.backend == "local" and current.model == "tiny-sd15"
    blob = storage.get(current.images[0].key)
    assert blob.metadata["model"] == "tiny-sd15"
    assert Image.open(io.BytesIO(blob.body)).size == (64, 64)
