"""Several waiting jobs in one pipeline call (a tier's ``batch_images``): real Valkey, real
S3, the tiny pipeline. Each job keeps its own prompt, seed, progress, cancel, result and
credits, and gets the image it gets alone."""

from __future__ import annotations

import io
import secrets
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from common.apikeys import KeyStore
from common.errors import NotFound
from common.job import Job, JobStatus
from common.settings import Settings
from common.storage import S3Storage
from common.store import JobStore
from common.tiers import Tiers, load_tiers
from tests.factories import expire_lease, queued_job
from workers.execute import WorkerContext, generation_for, take_and_execute
from workers.finisher import Finisher
from workers.pipeline import DiffusersRunner, Generation
from workers.progress import Canceled

OOM = "CUDA out of memory. Tried to allocate 20.00 MiB"


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> DiffusersRunner:
    runner = DiffusersRunner(str(tiny_model))
    runner.load()
    return runner


@pytest.fixture
def lane() -> str:
    """A lane of its own per test, one no worker serves: no other test's job joins a call."""
    return f"normal.batching{secrets.token_hex(4)}"


@pytest.fixture
def ctx(settings: Settings, store: JobStore, storage: S3Storage, runner) -> WorkerContext:
    """A worker whose tier ``normal`` runs up to 4 images of waiting jobs in one call."""
    tiers = Tiers(
        [
            tier.model_copy(update={"batch_images": 4}) if tier.name == "normal" else tier
            for tier in load_tiers()
        ]
    )
    return WorkerContext(settings, store, storage, runner, tiers=tiers)


@pytest.fixture
def unet_calls(runner: DiffusersRunner, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size (images x 2 for guidance) of every UNet call."""
    calls: list[int] = []
    forward = runner.pipe.unet.forward

    def counted(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(runner.pipe.unet, "forward", counted)
    return calls


def waiting(store: JobStore, keys: KeyStore, lane: str, prompt: str, seed: int, **fields) -> Job:
    """A queued job of a new key with 10 credits (2 an image), 3 steps, PNG."""
    return queued_job(
        store, keys, lane=lane, prompt=prompt, seed=seed, steps=3, output_format="png", **fields
    )


def pixels(storage: S3Storage, store: JobStore, job_id: str) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(storage.get(image.key).body)))
        for image in store.get(job_id).images
    ]


def alone(runner: DiffusersRunner, job: Job) -> list[np.ndarray]:
    """What ``job`` paints when it runs by itself (through PNG, as stored)."""
    images = []
    for image in runner.generate(generation_for(job, "euler")):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        images.append(np.asarray(Image.open(buffer)))
    return images


def same_images(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.std() > 1  # noise, not a blank image
        # Batched kernels may round a rare pixel by one level.
        assert np.abs(a.astype(int) - b).max() <= 1


@pytest.fixture
def published(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[int, int]]]:
    """The steps each job published, by job id (each also goes out as ``job.progress``)."""
    steps: dict[str, list[tuple[int, int]]] = {}
    progress = store.progress

    def record(job: Job, batch: Any) -> Any:
        steps.setdefault(job.id, []).extend((step, total) for step, total, _ in batch)
        return progress(job, batch)

    monkeypatch.setattr(store, "progress", record)
    return steps


def test_jobs_of_one_shape_share_a_call_each_with_its_own_images_and_progress(
    ctx, store, keys, storage, runner, lane, unet_calls, published
) -> None:
    first = waiting(store, keys, lane, "a lighthouse at dusk", 11)
    two = waiting(store, keys, lane, "a red kite", 22, num_images=2)
    other_negative = waiting(store, keys, lane, "a fox", 5, negative_prompt="blurry")
    third = waiting(store, keys, lane, "a fox in snow", 33)
    more_steps = waiting(store, keys, lane, "a barn", 44)
    store.redis.hset(f"sdq:job:{more_steps.id}", "steps", "4")

    # The first job's message takes it, and the two waiting jobs of its shape (4 images).
    assert take_and_execute(ctx, first.id, f"{lane}-1") == (first.id, JobStatus.SUCCEEDED)
    assert unet_calls == [8, 8, 8]  # 4 images, with guidance, 3 steps: one call
    for job in (first, two, third):
        done = store.get(job.id)
        assert done.status is JobStatus.SUCCEEDED and done.backend == "local"
        assert [image.seed for image in done.images] == generation_for(job).seeds
        same_images(pixels(storage, store, job.id), alone(runner, job))
        assert published[job.id] == [(1, 3), (2, 3), (3, 3)]
        assert done.progress == {"step": 3, "total": 3}
        assert keys.credits(job.key_id) == 10 - job.cost  # charged once, no refund
    assert store.get(two.id).images[1].seed == 23
    assert store.get(other_negative.id).status is JobStatus.QUEUED
    assert store.get(more_steps.id).status is JobStatus.QUEUED

    # The jobs that ran together still have their messages: those run what is left, alone,
    # and the last finds nothing to do.
    unet_calls.clear()
    assert take_and_execute(ctx, two.id, f"{lane}-2") == (other_negative.id, JobStatus.SUCCEEDED)
    assert take_and_execute(ctx, third.id, f"{lane}-3") == (more_steps.id, JobStatus.SUCCEEDED)
    assert unet_calls == [2] * 3 + [2] * 4
    assert take_and_execute(ctx, other_negative.id, f"{lane}-4") is None
    same_images(pixels(storage, store, other_negative.id), alone(runner, other_negative))


def test_a_job_canceled_in_a_shared_call_ends_canceled_and_refunded_the_rest_succeed(
    ctx, store, keys, storage, lane, runner, monkeypatch
) -> None:
    first = waiting(store, keys, lane, "a lighthouse at dusk", 11)
    canceled = waiting(store, keys, lane, "a red kite", 22)
    third = waiting(store, keys, lane, "a fox in snow", 33)
    forward = runner.pipe.unet.forward
    calls: list[int] = []

    def cancel_on_first_step(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(sample.shape[0])
        if len(calls) == 1:
            store.cancel(store.get(canceled.id))  # as POST /v1/jobs/{id}/cancel does
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(runner.pipe.unet, "forward", cancel_on_first_step)
    assert take_and_execute(ctx, first.id, f"{lane}-1") == (first.id, JobStatus.SUCCEEDED)
    assert calls == [6, 6, 6]
    assert store.get(third.id).status is JobStatus.SUCCEEDED
    ended = store.get(canceled.id)
    assert ended.status is JobStatus.CANCELED and ended.images == []
    assert keys.credits(canceled.key_id) == 10  # refunded
    with pytest.raises(NotFound):
        storage.get(f"images/{canceled.id}/0.png")  # nothing uploaded for it
    assert [e["type"] for e in store.events(canceled.id)][-1] == "job.canceled"


def test_out_of_memory_in_a_shared_call_runs_each_job_alone(
    ctx, store, keys, storage, lane, runner, monkeypatch, published
) -> None:
    jobs = [waiting(store, keys, lane, f"prompt {n}", n) for n in range(3)]
    forward = runner.pipe.unet.forward
    calls: list[int] = []

    def full_gpu(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(sample.shape[0])
        if sample.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError(OOM)
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(runner.pipe.unet, "forward", full_gpu)
    assert take_and_execute(ctx, jobs[0].id, f"{lane}-1") == (jobs[0].id, JobStatus.SUCCEEDED)
    assert calls == [6] + [2] * 9  # the shared call, then each job alone
    monkeypatch.setattr(runner.pipe.unet, "forward", forward)
    for job in jobs:
        done = store.get(job.id)
        assert done.status is JobStatus.SUCCEEDED and done.remote_reason is None
        same_images(pixels(storage, store, job.id), alone(runner, job))
        assert published[job.id] == [(1, 3), (2, 3), (3, 3)]


def test_out_of_memory_at_the_shared_decode_reruns_each_job_with_progress_going_on(
    ctx, store, keys, storage, lane, runner, monkeypatch, published
) -> None:
    jobs = [waiting(store, keys, lane, f"prompt {n}", n) for n in range(2)]
    decode = runner.pipe.vae.decode

    def full_gpu(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if latents.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError(OOM)
        return decode(latents, *args, **kwargs)

    monkeypatch.setattr(runner.pipe.vae, "decode", full_gpu)
    assert take_and_execute(ctx, jobs[0].id, f"{lane}-1") == (jobs[0].id, JobStatus.SUCCEEDED)
    monkeypatch.setattr(runner.pipe.vae, "decode", decode)
    for job in jobs:
        assert store.get(job.id).status is JobStatus.SUCCEEDED
        same_images(pixels(storage, store, job.id), alone(runner, job))
        # Its three steps in the shared call, then three more alone: never backwards.
        assert published[job.id] == [(1, 3), (2, 3), (3, 3), (4, 6), (5, 6), (6, 6)]


def test_jobs_of_a_shared_call_are_finished_while_the_pipeline_runs_on(
    ctx, store, keys, storage, lane, runner
) -> None:
    jobs = [waiting(store, keys, lane, f"prompt {n}", n) for n in range(2)]
    ctx.finisher = Finisher()
    # Handed over to be uploaded and ended on the finisher's thread: running until then.
    assert take_and_execute(ctx, jobs[0].id, f"{lane}-1") == (jobs[0].id, JobStatus.RUNNING)
    assert ctx.finisher.drain(30)
    for job in jobs:
        assert store.get(job.id).status is JobStatus.SUCCEEDED
        same_images(pixels(storage, store, job.id), alone(runner, job))
    alive = {thread.name for thread in threading.enumerate()}
    assert [job.id for job in jobs if f"lease-{job.id}" in alive] == []  # released when done


def test_jobs_started_beside_another_leave_their_keys_turns(store, keys, lane) -> None:
    first = waiting(store, keys, lane, "one", 1)
    second = waiting(store, keys, lane, "two", 2)
    assert store.waiting(lane, 5, 10) == [first.id, second.id]
    assert store.take(first.id, f"{lane}-a") == first.id
    assert store.start(second.id, holder="elsewhere:1").applied  # started beside the first
    assert store.take_more([first.id, second.id]) == 1  # the first left its turn with take
    assert store.waiting(lane, 5, 10) == []
    assert store.redis.lrange(f"sdq:fair:{lane}:5", 0, -1) == []  # no key with nothing waiting
    assert store.take(second.id, f"{lane}-b") is None  # its message has nothing to run


def test_a_job_run_before_runs_alone(ctx, store, keys, lane, unet_calls) -> None:
    """It may be the job that killed its last worker: it takes no other job down with it."""
    again = waiting(store, keys, lane, "again", 1)
    store.start(again.id, holder="gone:1")
    expire_lease(store, again.id)
    store.requeue(again.id)
    fresh = waiting(store, keys, lane, "fresh", 2)
    assert take_and_execute(ctx, again.id, f"{lane}-1") == (again.id, JobStatus.SUCCEEDED)
    assert unet_calls == [2, 2, 2]
    assert store.get(fresh.id).status is JobStatus.QUEUED


class FullFinisher(Finisher):
    """A finisher whose one slot stays taken until the task's time limit strikes."""

    def submit(self, work: Any) -> None:
        raise SoftTimeLimitExceeded()


def test_a_task_stopped_while_handing_over_lets_the_leases_go(ctx, store, keys, lane) -> None:
    jobs = [waiting(store, keys, lane, f"prompt {n}", n) for n in range(2)]
    ctx.finisher = FullFinisher()
    with pytest.raises(SoftTimeLimitExceeded):
        take_and_execute(ctx, jobs[0].id, f"{lane}-1")
    alive = {thread.name for thread in threading.enumerate()}
    for job in jobs:
        assert f"lease-{job.id}" not in alive  # not renewed: it runs out, and is requeued
        assert store.get(job.id).status is JobStatus.RUNNING


def tiny_generation(prompt: str, seeds: list[int]) -> Generation:
    return Generation(
        prompt=prompt,
        negative_prompt=None,
        guidance_scale=5.0,
        steps=2,
        width=None,
        height=None,
        seeds=seeds,
    )


def test_the_runner_drops_a_canceled_generation_and_stops_once_all_are(runner) -> None:
    generations = [tiny_generation("a", [1]), tiny_generation("b", [2, 3])]
    steps: list[tuple[int, int]] = []

    def gone(step: int, total: int) -> None:
        raise Canceled()

    def kept(step: int, total: int) -> None:
        steps.append((step, total))

    first, second = runner.generate_many(generations, [gone, kept])
    assert first is None and second is not None and len(second) == 2
    assert steps == [(1, 2), (2, 2)]
    with pytest.raises(Canceled):
        runner.generate_many(generations, [gone, gone])
    with pytest.raises(ValueError, match="different shapes"):
        runner.generate_many(
            [generations[0], replace(generations[0], negative_prompt="blurry")], [None, None]
        )
