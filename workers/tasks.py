"""Celery tasks: thin wrappers that decode the job id and call ``workers.execute``."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task
from celery.exceptions import Reject
from celery.signals import worker_process_init

from common.errors import ModelLoadError
from common.metrics import Recorder
from common.queue import GENERATE_TASK
from common.redis import connect
from common.settings import get_settings
from common.storage import make_storage
from common.store import JobStore
from common.tiers import load_tiers
from workers.celery_app import app
from workers.execute import StoreUnavailable, WorkerContext, execute
from workers.pipeline import Generation, SdxlRunner
from workers.remote import RemoteRunners

log = logging.getLogger(__name__)

_context: WorkerContext | None = None


def context() -> WorkerContext:
    """This process's store, storage and runners, made once."""
    global _context
    if _context is None:
        settings = get_settings()
        local = None
        if settings.runner != "remote":
            local = SdxlRunner(
                settings.model_path,
                compile=settings.torch_compile,
                vae=settings.vae_model,
                variant=settings.model_variant,
                threads=settings.torch_threads,
            )
        _context = WorkerContext(
            settings=settings,
            store=JobStore(
                connect(settings.redis_url, timeout=settings.redis_socket_timeout_seconds),
                finished_ttl=settings.job_ttl_seconds,
                lease_seconds=settings.lease_seconds,
                stuck_ttl=settings.stuck_ttl_seconds,
            ),
            storage=make_storage(settings),
            local=local,
            remote=RemoteRunners(settings).for_url,
            tiers=load_tiers(settings.tiers_file),
            metrics=Recorder(connect(settings.redis_url)),
        )
    return _context


@worker_process_init.connect
def load_model(**_: Any) -> None:
    """Load the pipeline in each pool child, after the fork (CUDA does not survive fork)."""
    runner = context().local
    if isinstance(runner, SdxlRunner):
        try:
            runner.load()
        except ModelLoadError as exc:
            # Jobs now fail with this message (refunded), or go to the tier's remote API
            # where its load_failed policy allows.
            log.error("%s", exc.message)


@app.task(name="sdq.noop", ignore_result=True)
def noop(sent_at: float) -> None:
    """Does nothing but note how long its message took to start: the broker and Celery's own
    latency, which ``bench/bench.py`` sets against a job's."""
    context().store.redis.rpush("sdq:bench:noop", time.time() - sent_at)


@app.task(name="sdq.bench.pipeline", ignore_result=True)
def pipeline_loop(images: int, steps: int, scheduler: str, reply_to: str) -> None:
    """Calls this process's pipeline ``images`` times in a row, as a plain loop would, and
    pushes each call's seconds to the list ``reply_to``: the baseline that ``bench/bench.py``
    sets sdq's throughput against, run by the very process and pipeline that run jobs."""
    runner = context().local
    if runner is None:
        raise ModelLoadError("this worker has no local pipeline")
    generation = Generation("bench", None, 7.5, steps, None, None, [0], scheduler)
    times = []
    for _ in range(images):
        began = time.perf_counter()
        runner.generate(generation)
        times.append(time.perf_counter() - began)
    context().store.redis.rpush(reply_to, *times)


@app.task(name=GENERATE_TASK, ignore_result=True, bind=True)
def generate(self: Task, job_id: str) -> str | None:
    """Run one job: the next in turn by key at the tier and priority of ``job_id``, the job
    this message was sent for (the message carries its id only)."""
    try:
        ended = execute(context(), job_id, task_id=self.request.id)
    except StoreUnavailable as exc:
        # Back to the queue, not acked away: the job's record could not be moved on.
        raise Reject(exc.message, requeue=True) from exc
    return None if ended is None else ended.value
