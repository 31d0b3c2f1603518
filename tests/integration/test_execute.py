"""A job's way through a worker, called directly: real Valkey, real S3, the tiny pipeline."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from common.apikeys import KeyStore
from common.errors import ModelLoadError
from common.job import ErrorCode, Job, JobRequest, JobStatus
from common.settings import Settings
from common.storage import S3Storage
from common.store import JobStore
from common.styles import Styles
from common.tiers import load_tiers
from tests.factories import PARKED, expire_lease, queued_job
from workers.execute import WorkerContext, execute, generation_for, scheduler_for
from workers.pipeline import DiffusersRunner, Generation


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> DiffusersRunner:
    runner = DiffusersRunner(str(tiny_model))
    runner.load()
    return runner


class BrokenRunner:
    backend = "local"
    model_name = "broken"
    load_error = None

    def generate(self, generation: Generation, on_step: object = None) -> list[Image.Image]:
        raise ModelLoadError("cannot load model 'broken': no such directory")


def queued(store: JobStore, keys: KeyStore, credits: int = 10, **fields: object) -> Job:
    fields.setdefault("lane", PARKED)
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
    assert failed.error == "the model could not be loaded"  # the library's words: logs only
    assert failed.error_code is ErrorCode.MODEL_UNAVAILABLE
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
        DiffusersRunner(str(tmp_path / "nothing-here")).load()


def test_a_job_of_a_model_this_worker_does_not_hold_fails_refunded(
    settings, store, keys, storage, runner
) -> None:
    job = queued(store, keys, credits=10)
    store.redis.hset(f"sdq:job:{job.id}", "model_id", json.dumps("sd15"))  # misrouted
    ctx = WorkerContext(settings, store, storage, runner)  # serves sdxl
    assert execute(ctx, job.id) is JobStatus.FAILED
    failed = store.get(job.id)
    assert failed.error == "model sd15 is not served by this worker (it serves sdxl)"
    assert failed.refunded and keys.credits(job.key_id) == 10


INKED = """
[styles.inked]
id = 90
name = "Inked"
prompt = "ink drawing of {prompt}"
negative_prompt = "colour"
scheduler = "ddim"

[styles.plain]
id = 91
name = "Plain"
prompt = "{prompt}"
"""


def test_a_job_runs_its_prompts_as_styled_and_its_style_scheduler(
    settings, store, keys, storage, runner
) -> None:
    tier = load_tiers().get("normal")
    job = Job(
        id="job_x", key_id="k", tier="normal", status=JobStatus.QUEUED, seed=1, steps=2,
        cost=2, created_at=0, request=JobRequest(prompt="a kite", negative_prompt="dull"),
        style="inked", prompt="ink drawing of a kite", negative_prompt="dull, colour",
    )  # fmt: skip
    ctx = WorkerContext(settings, store, storage, runner, styles=Styles.from_toml(INKED))
    generation = generation_for(job, scheduler_for(ctx, job, tier))
    assert (generation.prompt, generation.negative_prompt) == (
        "ink drawing of a kite",
        "dull, colour",
    )
    assert generation.scheduler == "ddim" and tier.scheduler == "euler"
    # A style without a scheduler, or one gone from the file: the tier's.
    for style in ("plain", "gone"):
        assert scheduler_for(ctx, job.model_copy(update={"style": style}), tier) == "euler"
    # A record from before styles runs its request's prompts.
    old = generation_for(job.model_copy(update={"prompt": None, "negative_prompt": None}))
    assert (old.prompt, old.negative_prompt) == ("a kite", "dull")
    # And through execute: the style's scheduler is the one the pipeline ran.
    queued_styled = queued(store, keys)
    store.redis.hset(f"sdq:job:{queued_styled.id}", "style", json.dumps("inked"))
    assert execute(ctx, queued_styled.id) is JobStatus.SUCCEEDED
    assert type(runner.pipe.scheduler).__name__ == "DDIMScheduler"
