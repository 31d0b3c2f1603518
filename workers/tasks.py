"""Celery tasks: thin wrappers that decode the job id and call ``workers.execute``."""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Ignore, Reject
from celery.signals import worker_process_init, worker_process_shutdown

from common.errors import ModelLoadError
from common.job import JobStatus
from common.metrics import Recorder
from common.models import load_models
from common.queue import GENERATE_TASK
from common.redis import connect
from common.settings import get_settings
from common.storage import make_storage
from common.store import JobStore
from common.styles import load_styles
from common.tiers import load_tiers
from workers.celery_app import app
from workers.execute import StoreUnavailable, WorkerContext, take_and_execute
from workers.finisher import Finisher
from workers.pipeline import DiffusersRunner, Generation
from workers.remote import RemoteRunners

log = logging.getLogger(__name__)

_context: WorkerContext | None = None
#: The models-file id of the model this worker serves: ``run_worker`` sets it in the Celery
#: parent, before the pool forks its children, which inherit it.
_model_id: str | None = None
#: The tiers it serves, dearest first (their precision and compile sizes), set likewise.
_tier_names: list[str] = []


def serve_model(model_id: str, tiers: list[str] | None = None) -> None:
    """Make ``model_id`` the model this process's pool children load and serve, on
    ``tiers`` (default: every tier that serves it)."""
    global _model_id, _tier_names
    _model_id = model_id
    _tier_names = list(tiers or [])


def context() -> WorkerContext:
    """This process's store, storage and runners, made once."""
    global _context
    if _context is None:
        settings = get_settings()
        models = load_models(settings.models_file)
        # Started without `sdq worker` (no model named): the models file's first.
        model = models.get(_model_id or models.ids[0])
        tiers = load_tiers(settings.tiers_file)
        local = None
        if settings.runner != "remote":
            served = [tiers.get(name) for name in _tier_names] or [
                tier for tier in tiers if model.id in tier.models
            ]
            local = DiffusersRunner.for_worker(settings, model, served)
        _context = WorkerContext(
            settings=settings,
            store=JobStore.from_settings(
                settings,
                connect(settings.redis_url, timeout=settings.redis_socket_timeout_seconds),
            ),
            storage=make_storage(settings),
            local=local,
            remote=RemoteRunners(settings).for_url if settings.remote_enabled else None,
            tiers=tiers,
            metrics=Recorder(connect(settings.redis_url)),
            model=model.id,
            styles=load_styles(settings.styles_file),
        )
    return _context


@worker_process_init.connect
def load_model(**_: Any) -> None:
    """Load the pipeline in each pool child, after the fork (CUDA does not survive fork)."""
    ctx = context()
    runner = ctx.local
    if isinstance(runner, DiffusersRunner):
        try:
            runner.load()
        except ModelLoadError as exc:
            # Jobs now fail with this message (refunded), or go to the tier's remote API
            # where its load_failed policy allows.
            log.error("%s", exc.message)
    overlap = ctx.settings.overlap_upload
    if overlap is None:
        overlap = isinstance(runner, DiffusersRunner) and runner.device == "cuda"
    if overlap:
        # The GPU starts the next job while this one's images are encoded and uploaded.
        ctx.finisher = Finisher()
        ctx.finisher_metrics = Recorder(connect(ctx.settings.redis_url))


@worker_process_shutdown.connect
def finish_jobs(**_: Any) -> None:
    """A pool child about to exit finishes the jobs it handed over; any it cannot in time
    keep their lease only until it runs out, and are requeued."""
    finisher = _context.finisher if _context is not None else None
    if finisher is not None and not finisher.drain(get_settings().upload_retry_seconds + 10):
        log.warning("exiting with jobs not finished: they run again once their leases end")


def noop(sent_at: float) -> None:
    """Does nothing but note how long its message took to start: the broker and Celery's own
    latency, which ``bench/bench.py`` sets against a job's."""
    context().store.redis.rpush("sdq:bench:noop", time.time() - sent_at)


def pipeline_loop(images: int, steps: int, scheduler: str, reply_to: str) -> None:
    """Calls this process's pipeline ``images`` times in a row, as a plain loop would, and
    pushes each call's seconds to the list ``reply_to``: the baseline that ``bench/bench.py``
    sets sdq's throughput against, run by the very process and pipeline that run jobs."""
    runner = context().local
    if runner is None:
        raise ModelLoadError("this worker has no local pipeline")
    generation = Generation(
        prompt="bench",
        negative_prompt=None,
        guidance_scale=7.5,
        steps=steps,
        width=None,
        height=None,
        seeds=[0],
        scheduler=scheduler,
    )
    times = []
    for _ in range(images):
        began = time.perf_counter()
        runner.generate(generation)
        times.append(time.perf_counter() - began)
    context().store.redis.rpush(reply_to, *times)


if get_settings().bench:
    # Benchmark tasks only where SDQ_BENCH=1 (bench/bench.py sets it): a serving fleet has
    # no task that runs its pipeline outside a job, uncharged.
    app.task(name="sdq.bench.noop", ignore_result=True)(noop)
    app.task(name="sdq.bench.pipeline", ignore_result=True)(pipeline_loop)


def _revoked(task: Task) -> NoReturn:
    """End the task as REVOKED, as a canceled job's task is: Celery has no such outcome for a
    running task (a rejected one shows as FAILURE), so announce it and ack the message."""
    task.send_event("task-revoked", terminated=False, signum=None, expired=False)
    raise Ignore()


class JobFailed(Exception):
    """Raised so that Flower shows a task whose job failed as failed, with the job's error;
    the job itself has already ended `failed` and refunded."""


@app.task(name=GENERATE_TASK, ignore_result=True, bind=True, throws=(JobFailed,))
def generate(self: Task, job_id: str) -> str | None:
    """Run one job: the next in turn by key at the tier and priority of ``job_id``, the job
    this message was sent for (the message carries its id only, as its task id too).

    The task's state follows the job's, for Flower: SUCCESS with ``"<job id> succeeded"``,
    FAILURE with the job's error, REVOKED when the job was canceled."""
    ctx = context()
    try:
        ran = take_and_execute(ctx, job_id, self.request.id)
    except StoreUnavailable as exc:
        # Back to the queue, not acked away: the job's record could not be moved on.
        raise Reject(exc.message, requeue=True) from exc
    if ran is None:
        # Its own job ended before any message ran it: canceled while queued, most often.
        try:
            status = ctx.store.get(job_id).status
        except Exception:  # gone, or the store away: the message has nothing to do anyway
            return f"{job_id}: no job was waiting"
        if status is JobStatus.CANCELED:
            _revoked(self)
        return f"{job_id} {status.value}: no job was waiting"
    ran_id, ended = ran
    if ended is JobStatus.CANCELED:
        _revoked(self)
    if ended is JobStatus.FAILED:
        try:
            error = ctx.store.get(ran_id).error
        except Exception:  # the job ended; only its message for Flower is missing
            error = None
        raise JobFailed(f"{ran_id} failed: {error or 'see its record'}")
    if ended is JobStatus.RUNNING:
        return f"{ran_id} generated: its images are being uploaded"
    return f"{ran_id} {'still running elsewhere' if ended is None else ended.value}"
