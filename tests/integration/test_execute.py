"""A job's way through a worker, called directly: real Valkey, real S3, the tiny pipeline."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from common.errors import ModelLoadError
from common.job import Job, JobStatus
from common.keys import KeyStore
from common.settings import Settings
from common.storage import S3Storage
from common.store import JobStore
from tests.factories import expire_lease, queued_job
from workers.execute import WorkerContext, execute
from workers.pipeline import Generation, SdxlRunner


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> SdxlRunner:
    runner = SdxlRunner(str(tiny_model))
    runner.load()
    return runner


class BrokenRunner:
    backend = "local"
    model_name = "broken"
    load_error = None

    def generate(self, generation: Generation, on_step: object = None) -> list[Image.Image]:
        raise ModelLoadError("cannot load model 'broken': no such directory")


def queued(store: JobStore, keys: KeyStore, credits: int = 10, **fields: object) -> Job:
    return queued_job(
        store, keys, credits=credits, seed=1234, steps=3, prompt="a lighthouse at dusk", **fields
    )


def test_success_stores_images_in_s3(
    settings: Settings, store, keys, storage: S3Storage, runner
) -> None:
    job = queued(store, keys, num_images=2, output_format="png")
    ctx = WorkerContext(settings, store, storage, runner)
    assert execute(ctx, job.id) is JobStatus.SUCCEEDED
    done = store.get(job.id)
    assert done.backend == "local" and done.model == "tiny-sdxl"
    assert [image.seed for image in done.images] == [1234, 1235]
    for index, image in enumerate(done.images):
        assert image.key == f"images/{job.id}/{index}.png"
        blob = storage.get(image.key)
        assert hashlib.sha256(blob.body).hexdigest() == image.sha256
        assert len(blob.body) == image.size_bytes
        assert blob.content_type == "image/png"
        assert blob.metadata["job-id"] == job.id and blob.metadata["seed"] == str(image.seed)
        assert blob.metadata["backend"] == "local" and blob.metadata["tier"] == "normal"
        assert Image.open(io.BytesIO(blob.body)).size == (64, 64)
    assert done.images[0].sha256 != done.images[1].sha256


def test_a_failing_pipeline_fails_and_refunds(settings, store, keys, storage) -> None:
    job = queued(store, keys, credits=10)
    assert keys.credits(job.key_id) == 8
    ctx = WorkerContext(settings, store, storage, BrokenRunner())
    assert execute(ctx, job.id) is JobStatus.FAILED
    failed = store.get(job.id)
    assert failed.error == "cannot load model 'broken': no such directory"
    assert failed.refunded and keys.credits(job.key_id) == 10


def test_a_canceled_job_is_dropped(settings, store, keys, storage) -> None:
    job = queued(store, keys)
    store.cancel(job)
    ctx = WorkerContext(settings, store, storage, BrokenRunner())
    assert execute(ctx, job.id) is JobStatus.CANCELED
    assert [e["type"] for e in store.events(job.id)] == ["job.queued", "job.canceled"]


def test_a_job_that_keeps_killing_workers_ends_failed(settings, store, keys, storage) -> None:
    job = queued(store, keys, credits=10)
    for _ in range(settings.max_deliveries):
        store.start(job.id)  # each delivery whose worker died
        expire_lease(store, job.id)
    ctx = WorkerContext(settings, store, storage, BrokenRunner())
    assert execute(ctx, job.id) is JobStatus.FAILED
    failed = store.get(job.id)
    assert (
        failed.error
        == f"gave up after {settings.max_deliveries} deliveries: the worker was lost each time"
    )
    assert keys.credits(job.key_id) == 10


def test_a_missing_model_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot load model"):
        SdxlRunner(str(tmp_path / "nothing-here")).load()
