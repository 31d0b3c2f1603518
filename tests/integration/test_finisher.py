"""A GPU worker's finisher: the pipeline runs the next job while the last one's images are
encoded and uploaded. Real Valkey, real S3, the tiny pipeline."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import pytest

from common.apikeys import KeyStore
from common.errors import NotFound, StorageError
from common.job import ErrorCode, Job, JobStatus
from common.settings import Settings
from common.storage import S3Storage
from common.store import JobStore
from tests.factories import PARKED, queued_job
from workers.execute import WorkerContext, execute
from workers.finisher import Finisher


class HeldStorage:
    """The real storage, whose puts wait until the test lets them through."""

    def __init__(self, storage: S3Storage, fail: bool = False) -> None:
        self.storage = storage
        self.fail = fail
        self.release = threading.Event()
        self.waiting = threading.Event()

    def put(self, *args: Any, **kwargs: Any) -> None:
        self.waiting.set()
        assert self.release.wait(60)
        if self.fail:
            raise StorageError("S3 said no")
        self.storage.put(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


def queued(store: JobStore, keys: KeyStore, **fields: object) -> Job:
    fields.setdefault("lane", PARKED)
    return queued_job(store, keys, credits=10, seed=77, steps=2, output_format="png", **fields)


def overlapping(settings: Settings, store: JobStore, storage: Any, runner: Any) -> WorkerContext:
    ctx = WorkerContext(settings, store, storage, runner)
    ctx.finisher = Finisher()
    return ctx


def test_the_next_job_generates_while_the_last_one_uploads(
    settings: Settings, store: JobStore, keys: KeyStore, storage: S3Storage, tiny_runner: Any
) -> None:
    held = HeldStorage(storage)
    ctx = overlapping(settings, store, held, tiny_runner)
    first, second = queued(store, keys), queued(store, keys)
    assert execute(ctx, first.id) is JobStatus.RUNNING
    assert held.waiting.wait(30)
    # The first job's upload is held, and the pipeline runs the second meanwhile.
    assert execute(ctx, second.id) is JobStatus.RUNNING
    assert store.get(first.id).status is JobStatus.RUNNING
    assert store.get(second.id).status is JobStatus.RUNNING
    held.release.set()
    assert ctx.finisher is not None and ctx.finisher.drain(60)
    for job in (first, second):
        done = store.get(job.id)
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert keys.credits(job.key_id) == 8
        [image] = done.images
        blob = storage.get(image.key)
        assert hashlib.sha256(blob.body).hexdigest() == image.sha256
        assert blob.body[:8] == b"\x89PNG\r\n\x1a\n"
        assert blob.metadata["job-id"] == job.id
    types = [event["type"] for event in store.events(first.id)]
    assert types == ["job.queued", "job.started", "job.succeeded"]


def test_an_upload_that_fails_there_fails_the_job_refunded(
    settings: Settings, store: JobStore, keys: KeyStore, storage: S3Storage, tiny_runner: Any
) -> None:
    held = HeldStorage(storage, fail=True)
    held.release.set()
    quick = settings.model_copy(update={"upload_retry_seconds": 0.0})
    ctx = overlapping(quick, store, held, tiny_runner)
    job = queued(store, keys)
    assert keys.credits(job.key_id) == 8
    assert execute(ctx, job.id) is JobStatus.RUNNING
    assert ctx.finisher is not None and ctx.finisher.drain(60)
    failed = store.get(job.id)
    assert failed.status is JobStatus.FAILED
    assert failed.error_code is ErrorCode.STORAGE_FAILED
    assert failed.refunded and keys.credits(job.key_id) == 10


def test_a_job_canceled_while_it_uploads_keeps_no_images(
    settings: Settings, store: JobStore, keys: KeyStore, storage: S3Storage, tiny_runner: Any
) -> None:
    held = HeldStorage(storage)
    ctx = overlapping(settings, store, held, tiny_runner)
    job = queued(store, keys)
    assert execute(ctx, job.id) is JobStatus.RUNNING
    assert held.waiting.wait(30)
    assert store.cancel(store.get(job.id)).applied
    held.release.set()
    assert ctx.finisher is not None and ctx.finisher.drain(60)
    canceled = store.get(job.id)
    assert canceled.status is JobStatus.CANCELED and canceled.images == []
    assert keys.credits(job.key_id) == 10
    with pytest.raises(NotFound):
        storage.get(f"images/{job.id}/0.png")


def test_without_a_finisher_the_task_ends_the_job_itself(
    settings: Settings, store: JobStore, keys: KeyStore, storage: S3Storage, tiny_runner: Any
) -> None:
    job = queued(store, keys)
    ctx = WorkerContext(settings, store, storage, tiny_runner)
    assert execute(ctx, job.id) is JobStatus.SUCCEEDED
    assert store.get(job.id).status is JobStatus.SUCCEEDED
