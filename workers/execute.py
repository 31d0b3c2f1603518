"""One job's way through a worker: start, generate, encode, upload, finish.

Plain functions over a ``WorkerContext``, so tests call them directly; the Celery task only
decodes the job id and calls ``execute``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from common.errors import SdqError
from common.job import EXTENSIONS, MAX_SEED, ImageResult, Job, JobStatus
from common.settings import Settings
from common.storage import Storage, object_key
from common.store import JobStore
from workers.encode import encode
from workers.pipeline import Generation, StepCallback

log = logging.getLogger(__name__)


class Canceled(Exception):
    """Raised from the step callback when the job was canceled while it ran."""


class Runner(Protocol):
    """Anything that turns a ``Generation`` into images: the local pipeline or a remote API."""

    backend: str

    @property
    def model_name(self) -> str: ...

    def generate(
        self, generation: Generation, on_step: StepCallback | None = None
    ) -> list[Image.Image]: ...


@dataclass
class WorkerContext:
    settings: Settings
    store: JobStore
    storage: Storage
    runner: Runner


def generation_for(job: Job) -> Generation:
    request = job.request
    return Generation(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        guidance_scale=request.guidance_scale,
        steps=job.steps,
        width=request.width,
        height=request.height,
        seeds=[(job.seed + i) % (MAX_SEED + 1) for i in range(request.num_images)],
    )


def upload(
    ctx: WorkerContext, job: Job, images: list[Image.Image], seeds: list[int]
) -> list[ImageResult]:
    """Encode and store each image under its deterministic key; a retry overwrites."""
    fmt = job.request.output_format
    results = []
    for index, (image, seed) in enumerate(zip(images, seeds, strict=True)):
        body, content_type = encode(image, fmt)
        key = object_key(ctx.settings.s3_prefix, job.id, index, EXTENSIONS[fmt])
        metadata = {
            "job-id": job.id,
            "tier": job.tier,
            "seed": str(seed),
            "model": ctx.runner.model_name,
            "backend": ctx.runner.backend,
        }
        ctx.storage.put(key, body, content_type, metadata)
        results.append(
            ImageResult(
                index=index,
                key=key,
                content_type=content_type,
                size_bytes=len(body),
                sha256=hashlib.sha256(body).hexdigest(),
                seed=seed,
                width=image.width,
                height=image.height,
            )
        )
    return results


def execute(ctx: WorkerContext, job_id: str) -> JobStatus:
    """Run job ``job_id`` to a terminal state; returns the state it ended in."""
    job = ctx.store.get(job_id)
    started = ctx.store.start(job)
    if not started.applied:
        log.info("job %s: not started, it is %s", job_id, started.current.value)
        return started.current
    if started.attempts > ctx.settings.max_deliveries:
        # The message came back after killing its worker too many times: stop the loop.
        message = f"gave up after {started.attempts - 1} deliveries: the worker was lost each time"
        log.error("job %s: %s", job_id, message)
        ctx.store.fail(job, message)
        return JobStatus.FAILED
    log.info("job %s: attempt %d on tier %s", job_id, started.attempts, job.tier)
    generation = generation_for(job)

    def on_step(step: int, total: int) -> None:
        # One round trip per step publishes progress and learns of a cancel.
        status = ctx.store.progress(job, step, total)
        if status is not JobStatus.RUNNING:
            raise Canceled()

    try:
        images = ctx.runner.generate(generation, on_step)
        results = upload(ctx, job, images, generation.seeds)
    except Canceled:
        log.info("job %s: canceled while running; stopped", job_id)
        return JobStatus.CANCELED
    except SdqError as exc:
        log.error("job %s failed: %s", job_id, exc.message)
        ctx.store.fail(job, exc.message)
        return JobStatus.FAILED
    except Exception:
        log.exception("job %s failed", job_id)
        ctx.store.fail(job, "internal error while generating")
        return JobStatus.FAILED
    outcome = ctx.store.succeed(
        job, results, backend=ctx.runner.backend, model=ctx.runner.model_name
    )
    if not outcome.applied:
        log.info("job %s finished but is already %s", job_id, outcome.current.value)
        return outcome.current
    return JobStatus.SUCCEEDED
