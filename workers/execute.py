"""One job's way through a worker: start, generate, encode, upload, finish.

Plain functions over a ``WorkerContext``, so tests call them directly; the Celery task only
decodes the job id and calls ``execute``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Protocol

from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image, UnidentifiedImageError
from redis.exceptions import RedisError
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from common.errors import (
    InvalidRequest,
    JobTimeout,
    ModelLoadError,
    ModelNotHere,
    NotFound,
    RemoteApiError,
    SdqError,
    StorageError,
)
from common.job import EXTENSIONS, MAX_SEED, ErrorCode, ImageResult, Job, JobStatus
from common.metrics import Recorder
from common.queue import time_limits
from common.settings import Settings
from common.storage import Storage, job_prefix, object_key
from common.store import JobStore, Transition
from common.styles import Styles, load_styles
from common.tiers import FallbackPolicy, Tier, Tiers, load_tiers
from workers.batching import Member, gather
from workers.encode import encode
from workers.finisher import Finisher
from workers.lease import Lease
from workers.pipeline import BatchOutOfMemory, CudaOutOfMemory, Generation, StepCallback
from workers.progress import Canceled, StepReporter

log = logging.getLogger(__name__)


class Runner(Protocol):
    """Anything that turns a ``Generation`` into images: the local pipeline or a remote API."""

    backend: str
    #: Why the runner cannot work (a model that failed to load), or None.
    load_error: str | None

    @property
    def model_name(self) -> str: ...

    def generate(
        self, generation: Generation, on_step: StepCallback | None = None
    ) -> list[Image.Image]: ...


@dataclass
class WorkerContext:
    """What a worker process runs jobs with. ``local`` is ``None`` when this machine has no
    device for its tiers; ``remote`` gives the runner of a tier's remote API. ``model`` is
    the models-file id of the one model this worker serves (its local runner holds)."""

    settings: Settings
    store: JobStore
    storage: Storage
    local: Runner | None
    remote: Callable[[str], Runner] | None = None
    tiers: Tiers = field(default_factory=load_tiers)
    metrics: Recorder | None = None
    model: str = "sdxl"
    styles: Styles = field(default_factory=load_styles)
    #: Where jobs go to be encoded, uploaded and ended while the pipeline runs the next;
    #: ``None`` finishes each job inside its own task. Its thread has its own recorder.
    finisher: Finisher | None = None
    finisher_metrics: Recorder | None = None


def generation_for(
    job: Job, scheduler: str = "euler", init_image: Image.Image | None = None
) -> Generation:
    """The pipeline call of ``job``: its prompts as run (after its style), and for
    image-to-image its input and strength."""
    request = job.request
    if job.prompt is None:  # a record from before styles: its request's prompts
        prompt, negative_prompt = request.prompt, request.negative_prompt
    else:
        prompt, negative_prompt = job.prompt, job.negative_prompt
    return Generation(
        prompt=prompt,
        negative_prompt=negative_prompt,
        guidance_scale=request.guidance_scale,
        steps=job.steps,
        width=request.width,
        height=request.height,
        seeds=[(job.seed + i) % (MAX_SEED + 1) for i in range(request.num_images)],
        scheduler=scheduler,
        init_image=init_image,
        strength=request.strength,
    )


def scheduler_for(ctx: WorkerContext, job: Job, tier: Tier) -> str:
    """The job's style's scheduler where it names one, else its tier's."""
    if job.style is not None:
        try:
            style = ctx.styles.get(job.style)
        except InvalidRequest:
            log.warning("job %s: style %s left the styles file", job.id, job.style)
        else:
            if style.scheduler is not None:
                return style.scheduler
    return tier.scheduler


def _storage_retry(ctx: WorkerContext) -> Retrying:
    # botocore retries a few times itself; an S3 restart can take longer than that.
    return Retrying(
        retry=retry_if_exception_type(StorageError),
        stop=stop_after_delay(ctx.settings.upload_retry_seconds),
        wait=wait_exponential(multiplier=0.2, max=5),
        reraise=True,
    )


def read_init_image(ctx: WorkerContext, job: Job) -> Image.Image | None:
    """Image-to-image: the job's input, as the API stored it (PNG); ``None`` without one."""
    key = job.init_image_key
    if key is None:
        return None
    try:
        blob = _storage_retry(ctx)(ctx.storage.get, key)
    except NotFound:
        log.error("job %s: its input image %s is gone from storage", job.id, key)
        raise InvalidRequest("the input image is gone from storage") from None
    try:
        with Image.open(io.BytesIO(blob.body)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        log.error("job %s: its input image %s cannot be read: %s", job.id, key, exc)
        raise InvalidRequest("the input image cannot be read") from None


def upload(
    ctx: WorkerContext, runner: Runner, job: Job, images: list[Image.Image], seeds: list[int]
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
            "model": runner.model_name,
            "backend": runner.backend,
        }
        _storage_retry(ctx)(ctx.storage.put, key, body, content_type, metadata)
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


#: What a job's owner reads of each kind of error (its class's words), and its code.
_FAILURES: tuple[tuple[type[SdqError], ErrorCode], ...] = (
    (CudaOutOfMemory, ErrorCode.OUT_OF_MEMORY),
    (RemoteApiError, ErrorCode.REMOTE_FAILED),
    (ModelLoadError, ErrorCode.MODEL_UNAVAILABLE),
    (StorageError, ErrorCode.STORAGE_FAILED),
    (JobTimeout, ErrorCode.TIMED_OUT),
)
GENERATION_FAILED = "internal error while generating"


def failure(exc: SdqError) -> tuple[ErrorCode, str]:
    """The code and plain words a job's owner gets for ``exc``. An invalid
    request's message is written for them; others carry where it failed (an endpoint, a
    path, a library's text), so they get their kind's words and the log gets the rest."""
    if isinstance(exc, InvalidRequest):
        return ErrorCode.INVALID_REQUEST, exc.message
    for kind, code in _FAILURES:
        if isinstance(exc, kind):
            return code, exc.message if exc.public else type(exc).message
    return ErrorCode.GENERATION_FAILED, GENERATION_FAILED


class StoreUnavailable(SdqError, ConnectionError):
    """The job store failed past its client's retries: the message goes back to the queue
    (never acked away), and runs again once the store answers."""


def take_and_execute(
    ctx: WorkerContext, job_id: str, task_id: str
) -> tuple[str, JobStatus | None] | None:
    """Run the job the message ``task_id``, sent for ``job_id``, runs: the next of its tier
    and priority in turn by key (fair share), or the one this message took before when it
    is redelivered. Returns that job's id and the state it ended in; ``None`` when no job
    was waiting any more. Every store error, at any step, raises ``StoreUnavailable``."""
    try:
        taken = ctx.store.take(job_id, task_id)
    except RedisError as exc:
        log.error("job %s: the job store failed: %s; requeueing its message", job_id, exc)
        raise StoreUnavailable(f"the job store failed: {exc}") from exc
    if taken is None:
        log.info("message for job %s: no job waiting to run", job_id)
        return None
    return taken, execute(ctx, taken)


def batched(recorder: Recorder | None, work: Callable[[Recorder | None], JobStatus]) -> JobStatus:
    """``work(metrics)``, a job's metrics going to Redis together when it ends: one round
    trip between this job and the next, instead of one per figure."""
    if recorder is None:
        return work(None)
    with recorder.batch() as metrics:
        return work(metrics)


def execute(ctx: WorkerContext, job_id: str) -> JobStatus | None:
    """Run a job to a terminal state; returns the state it ended in, or ``running`` when it
    went to ``ctx.finisher`` to be uploaded and ended there. Every store error, at any step
    before that, raises ``StoreUnavailable``."""
    try:
        return batched(ctx.metrics, lambda metrics: run(ctx, job_id, metrics))
    except RedisError as exc:
        log.error("job %s: the job store failed: %s; requeueing its message", job_id, exc)
        raise StoreUnavailable(f"the job store failed: {exc}") from exc


#: Who holds a lease this process takes: a pool child on this host.
def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(holder: str) -> bool:
    """Whether ``holder`` was a process of this host that is gone: the broker redelivers a
    killed pool child's message, often to the same node, and its lease need not be waited
    out. A holder elsewhere cannot be checked: its lease runs out instead."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def run(ctx: WorkerContext, job_id: str, metrics: Recorder | None) -> JobStatus:
    me = _holder()
    started = ctx.store.start(job_id, holder=me)  # reads the job, takes its lease: one trip
    if not started.applied and started.holder and _dead_here(started.holder):
        log.warning("job %s: its run in %s died; taking it over", job_id, started.holder)
        started = ctx.store.start(job_id, holder=me, takeover_from=started.holder)
    if not started.applied:
        # Ended, canceled, or running elsewhere under a live lease: this message is spare.
        log.info("job %s: not started, it is %s", job_id, started.current.value)
        return started.current
    job = started.job
    assert job is not None and started.clock is not None
    if started.attempts > ctx.settings.max_deliveries:
        # The message came back after killing its worker too many times: stop the loop.
        message = f"gave up after {started.attempts - 1} deliveries: the worker was lost each time"
        log.error("job %s: %s", job_id, message)
        ctx.store.fail(job, message, code=ErrorCode.LOST)
        return JobStatus.FAILED
    log.info("job %s: attempt %d on tier %s", job_id, started.attempts, job.tier)
    waited = started.clock - job.created_at  # one clock, the store's
    if metrics and started.attempts == 1:
        metrics.observe("sdq_queue_wait_seconds", waited, tier=job.tier)
    if job.tier not in ctx.tiers.names:
        message = f"tier {job.tier} is no longer served (it left the tiers file)"
        log.error("job %s: %s", job_id, message)
        ctx.store.fail(job, message, code=ErrorCode.INVALID_REQUEST)
        return JobStatus.FAILED
    tier = ctx.tiers.get(job.tier)

    try:
        runner, reason = choose_runner(ctx, job, tier, waited)
        members = together_with(ctx, job, tier, started, me, waited) if reason is None else []
    except Exception as exc:
        return ended_by(ctx, job, tier, exc)
    if len(members) > 1:
        return run_together(ctx, tier, runner, members, metrics)
    try:
        began = time.monotonic()
        with ExitStack() as held:
            lease = held.enter_context(Lease(ctx.store, job.id, started.attempts))
            init_image = read_init_image(ctx, job)
            generation = generation_for(job, scheduler_for(ctx, job, tier), init_image)
            with StepReporter(ctx.store, job, lease=lease) as on_step:
                images, runner, reason = generate_alone(
                    ctx, job, tier, (runner, reason), generation, on_step
                )
            # Leaving the block sent the last steps: before the job's terminal event.
            done = Generated(
                job=job,
                runner=runner,
                reason=reason,
                images=images,
                seeds=generation.seeds,
                waited=waited,
                began=began,
                generated=time.monotonic(),
            )
            if ctx.finisher is None:
                return finish(ctx, done, metrics)
            # The lease goes with the job: released once it is finished there.
            lease_held = held.pop_all()
    except Exception as exc:
        return ended_by(ctx, job, tier, exc)
    hand_over(ctx, lambda: finish_later(ctx, done, lease_held), [lease_held])
    return JobStatus.RUNNING


def hand_over(ctx: WorkerContext, work: Callable[[], object], leases: list[ExitStack]) -> None:
    """Give ``work`` (finishing jobs) to the finisher, their leases with it. A task stopped
    while it waits for a slot (its time limit) lets the leases go: they run out, and the
    reconciler requeues the jobs, instead of a lease renewed for ever."""
    assert ctx.finisher is not None
    try:
        ctx.finisher.submit(work)
    except BaseException:
        for lease in leases:
            lease.close()
        raise


def together_with(
    ctx: WorkerContext, job: Job, tier: Tier, started: Transition, holder: str, waited: float
) -> list[Member]:
    """``job`` and the waiting jobs that run in one call with it, each started as ``holder``
    (``workers.batching``): none where its tier runs each job alone, for image-to-image, and
    for a job run before (it may be the one that killed its worker)."""
    if tier.batch_images <= 1 or job.init_image_key is not None or started.attempts > 1:
        return []
    assert started.clock is not None
    generation = generation_for(job, scheduler_for(ctx, job, tier))
    first = Member(job, started.attempts, generation, waited)
    others = gather(
        ctx.store,
        first,
        tier,
        clock=started.clock,
        holder=holder,
        plan=lambda other, waited: local_generation(ctx, other, tier, waited),
    )
    return [first, *others]


def generate_alone(
    ctx: WorkerContext,
    job: Job,
    tier: Tier,
    chosen: tuple[Runner, str | None],
    generation: Generation,
    on_step: StepCallback,
) -> tuple[list[Image.Image], Runner, str | None]:
    """``job``'s images from the chosen runner (and why it was chosen), or from its tier's
    remote API where the GPU ran out of memory and the job and tier allow it; with the
    runner and reason that made them."""
    runner, reason = chosen
    try:
        return runner.generate(generation, on_step), runner, reason
    except CudaOutOfMemory:
        if not may_go_remote(ctx, job, tier, "oom"):
            raise
    runner = remote_runner(ctx, tier)
    log.warning("job %s: out of GPU memory; handing it to %s", job.id, tier.remote_url)
    return runner.generate(generation, on_step), runner, "oom"


def local_generation(ctx: WorkerContext, job: Job, tier: Tier, waited: float) -> Generation | None:
    """The generation a waiting ``job`` would run with on this worker's local pipeline, or
    ``None`` where it would not run there (``batching.gather`` asks)."""
    if job.init_image_key is not None:
        return None
    try:
        _, reason = choose_runner(ctx, job, tier, waited)
    except SdqError:
        return None
    return generation_for(job, scheduler_for(ctx, job, tier)) if reason is None else None


def run_together(
    ctx: WorkerContext, tier: Tier, runner: Runner, members: list[Member], metrics: Recorder | None
) -> JobStatus:
    """Run several started jobs in one call of the local pipeline (``workers.batching``),
    each with its own lease, progress, cancel and result, then finish each as ``run``
    does; returns the state the first one (the message's job) ended in."""
    if metrics:
        for member in members[1:]:
            metrics.observe("sdq_queue_wait_seconds", member.waited, tier=member.job.tier)
        metrics.inc("sdq_batched_jobs_total", len(members), tier=tier.name)
    ended: dict[str, JobStatus] = {}
    stacks = [ExitStack() for _ in members]
    handed: list[tuple[Generated, ExitStack]] = []
    try:
        reporters = [
            StepReporter(
                ctx.store,
                member.job,
                lease=stack.enter_context(Lease(ctx.store, member.job.id, member.attempt)),
            )
            for member, stack in zip(members, stacks, strict=True)
        ]
        began = time.monotonic()
        try:
            outputs = _generate_together(ctx, tier, runner, members, reporters, ended)
        except Exception as exc:  # the one call failed: every job in it not ended, alike
            for member in members:
                if member.job.id not in ended:
                    ended[member.job.id] = ended_by(ctx, member.job, tier, exc)
            return ended[members[0].job.id]
        generated = time.monotonic()
        for member, reporter, output, stack in zip(
            members, reporters, outputs, stacks, strict=True
        ):
            if member.job.id in ended:
                continue
            if output is None or not reporter.finish():
                log.info("job %s: canceled, or taken over, while running; stopped", member.job.id)
                ended[member.job.id] = JobStatus.CANCELED
                continue
            images, used, reason = output
            done = Generated(
                job=member.job,
                runner=used,
                reason=reason,
                images=images,
                seeds=member.generation.seeds,
                waited=member.waited,
                began=began,
                generated=generated,
            )
            if ctx.finisher is not None:
                handed.append((done, stack))
                ended[member.job.id] = JobStatus.RUNNING
                continue
            try:
                ended[member.job.id] = finish(ctx, done, metrics)
            except Exception as exc:
                ended[member.job.id] = ended_by(ctx, member.job, tier, exc)
    finally:
        kept = {id(stack) for _, stack in handed}
        for stack in stacks:
            if id(stack) not in kept:
                stack.close()
    if ctx.finisher is not None and handed:
        finishing = list(handed)
        # One hand-over for them all: the pipeline waits for one slot, not one per job.
        hand_over(
            ctx,
            lambda: [finish_later(ctx, done, stack) for done, stack in finishing],
            [stack for _, stack in finishing],
        )
    return ended[members[0].job.id]


def after(reporter: StepReporter) -> StepCallback:
    """``reporter`` for a rerun of its job: its steps go on from those already reported, so
    that progress never goes back and each step's id stays unique."""
    base = reporter.last_step

    def report(step: int, total: int) -> None:
        reporter(base + step, base + total)

    return report


#: A job's images, the runner that made them and why it ran them (``None``: the local one).
Output = tuple[list[Image.Image], Runner, str | None]


def _generate_together(
    ctx: WorkerContext,
    tier: Tier,
    runner: Runner,
    members: list[Member],
    reporters: list[StepReporter],
    ended: dict[str, JobStatus],
) -> list[Output | None]:
    """Each member's images (``None`` for one canceled meanwhile): one call, or each alone
    when the call ran out of GPU memory; a job that fails alone is ended here, in ``ended``."""
    together = getattr(runner, "generate_many", None)
    assert together is not None, "only the local pipeline runs jobs together"
    try:
        outputs = together([member.generation for member in members], reporters)
    except BatchOutOfMemory:
        log.warning("out of GPU memory with %d jobs in one call; each runs alone", len(members))
    else:
        return [None if images is None else (images, runner, None) for images in outputs]
    alone: list[Output | None] = []
    for member, reporter in zip(members, reporters, strict=True):
        try:
            alone.append(
                generate_alone(
                    ctx, member.job, tier, (runner, None), member.generation, after(reporter)
                )
            )
        except SoftTimeLimitExceeded:
            raise  # the task's time is up: for every job of the call not ended yet
        except Exception as exc:
            ended[member.job.id] = ended_by(ctx, member.job, tier, exc)
            alone.append(None)
    return alone


def ended_by(ctx: WorkerContext, job: Job, tier: Tier | None, exc: Exception) -> JobStatus:
    """End ``job`` for what stopped its run: canceled (already ended by whoever canceled
    it), or failed with its refund. A store error is the store's, not the job's: raised on,
    for the message to be requeued."""
    if isinstance(exc, Canceled):
        log.info("job %s: canceled, or taken over, while running; stopped", job.id)
        return JobStatus.CANCELED
    if isinstance(exc, RedisError):
        raise exc
    if isinstance(exc, SoftTimeLimitExceeded) and tier is not None:
        _, soft = time_limits(tier, ctx.settings)
        message = f"ran past the tier's time limit of {soft:.0f}s"
        log.error("job %s: %s", job.id, message)
        ctx.store.fail(job, message, code=ErrorCode.TIMED_OUT)
    elif isinstance(exc, SdqError):
        log.error("job %s failed: %s", job.id, exc.message)
        code, text = failure(exc)
        ctx.store.fail(job, text, code=code)
    else:
        log.error("job %s failed", job.id, exc_info=exc)
        ctx.store.fail(job, GENERATION_FAILED, code=ErrorCode.GENERATION_FAILED)
    return JobStatus.FAILED


@dataclass(frozen=True, kw_only=True)
class Generated:
    """A job's images, fresh from its runner, and what finishing it needs."""

    job: Job
    runner: Runner
    #: Why a remote API ran it, or ``None``.
    reason: str | None
    images: list[Image.Image]
    seeds: list[int]
    #: Seconds it waited in the queue, by the store's clock.
    waited: float
    #: ``time.monotonic()`` when its run began, and when its images were ready.
    began: float
    generated: float


def finish(ctx: WorkerContext, done: Generated, metrics: Recorder | None) -> JobStatus:
    """Encode and upload a job's images, then end it succeeded, unless it ended meanwhile
    (canceled, deleted): then what was uploaded goes. Raises what stopped it."""
    job, runner = done.job, done.runner
    results = upload(ctx, runner, job, done.images, done.seeds)
    uploaded = time.monotonic()
    try:
        outcome = ctx.store.succeed(
            job, results, backend=runner.backend, model=runner.model_name, remote_reason=done.reason
        )
    except NotFound:
        log.info("job %s finished but was deleted meanwhile", job.id)
        discard(ctx, job)
        return JobStatus.CANCELED
    if not outcome.applied:
        log.info("job %s finished but is already %s", job.id, outcome.current.value)
        if outcome.current in (JobStatus.CANCELED, JobStatus.FAILED):
            discard(ctx, job)  # not when queued again or succeeded: another run owns the keys
        return outcome.current
    if metrics:
        labels = {"tier": job.tier, "backend": runner.backend}
        metrics.observe("sdq_generation_seconds", done.generated - done.began, **labels)
        metrics.observe("sdq_upload_seconds", uploaded - done.generated, tier=job.tier)
        metrics.observe("sdq_job_duration_seconds", done.waited + uploaded - done.began, **labels)
        if done.reason is not None:
            metrics.inc("sdq_remote_fallbacks_total", tier=job.tier, reason=done.reason)
    return JobStatus.SUCCEEDED


def finish_later(ctx: WorkerContext, done: Generated, lease: ExitStack) -> JobStatus | None:
    """``finish`` on the finisher's thread, its lease held until the job has ended. A store
    error leaves the job running: its lease runs out and the reconciler requeues it."""
    with lease:
        try:
            return batched(ctx.finisher_metrics, lambda metrics: finish(ctx, done, metrics))
        except RedisError as exc:
            log.error("job %s: the job store failed while finishing it: %s", done.job.id, exc)
            return None
        except Exception as exc:
            try:
                return ended_by(ctx, done.job, None, exc)
            except RedisError as again:
                log.error("job %s: the job store failed while failing it: %s", done.job.id, again)
                return None


def discard(ctx: WorkerContext, job: Job) -> None:
    """Delete what a run uploaded for a job that ended (canceled) or was deleted meanwhile:
    the sweeper may have swept its objects before these arrived."""
    try:
        ctx.storage.delete_prefix(job_prefix(ctx.settings.s3_prefix, job.id))
    except StorageError as exc:
        log.warning("job %s: its images could not be deleted: %s", job.id, exc.message)


def remote_runner(ctx: WorkerContext, tier: Tier) -> Runner:
    if ctx.remote is None or tier.remote_url is None:
        raise RemoteApiError(f"tier {tier.name} has no remote API")
    return ctx.remote(tier.remote_url)


#: What a job that only a remote API could run tells its owner when remote is off.
REMOTE_OFF = "the remote fallback is off here (SDQ_REMOTE_FALLBACK, SDQ_REMOTE_API_KEY)"


def may_go_remote(ctx: WorkerContext, job: Job, tier: Tier, policy: FallbackPolicy) -> bool:
    """Whether ``policy`` sends ``job`` to its tier's remote API: the deployment opted in
    (``ctx.remote`` is set only then), the tier lists the policy, the job allows it, and
    the remote API can run it: text to image, of the tier's default model."""
    return (
        ctx.remote is not None
        and job.request.allow_remote
        and tier.falls_back(policy)
        and remote_can_run(job, tier) is None
    )


def remote_can_run(job: Job, tier: Tier) -> str | None:
    """Why the tier's remote API cannot run ``job``, or ``None`` when it can: it serves the
    tier's default model only, and text to image only."""
    if job.model_id != tier.default_model:
        return f"serves model {tier.default_model} only, not {job.model_id}"
    if job.init_image_key is not None:
        return "does not run image-to-image"
    return None


def choose_runner(
    ctx: WorkerContext, job: Job, tier: Tier, waited: float = 0.0
) -> tuple[Runner, str | None]:
    """The local pipeline, or the tier's remote API when a fallback policy says so;
    ``waited`` is how long the job waited in the queue, by the store's clock."""
    if tier.remote_only:
        if ctx.remote is None:
            raise InvalidRequest(f"tier {tier.name} runs only on its remote API, and {REMOTE_OFF}")
        if not job.request.allow_remote:
            raise InvalidRequest(
                f"tier {tier.name} runs only on its remote API, and the job forbids it"
            )
        why_not = remote_can_run(job, tier)
        if why_not is not None:
            raise InvalidRequest(f"tier {tier.name} runs only on its remote API, which {why_not}")
        return remote_runner(ctx, tier), "remote_only"
    if job.model_id != ctx.model:
        # Each (tier, model) pair has its own queue: only a misrouted message gets here.
        raise ModelNotHere(
            f"model {job.model_id} is not served by this worker (it serves {ctx.model})"
        )
    local = ctx.local
    unavailable: tuple[FallbackPolicy, str] | None = None
    if local is None:
        unavailable = ("no_device", f"no device of tier {tier.name}'s classes on this worker")
    elif local.load_error is not None:
        unavailable = ("load_failed", local.load_error)
    if unavailable is not None:
        policy, why = unavailable
        if may_go_remote(ctx, job, tier, policy):
            log.warning("job %s: %s; handing it to %s", job.id, why, tier.remote_url)
            return remote_runner(ctx, tier), policy
        raise ModelNotHere(why) if policy == "no_device" else ModelLoadError(why)
    assert local is not None
    spill = tier.spillover_after_seconds
    if may_go_remote(ctx, job, tier, "spillover") and spill is not None and waited > spill:
        log.info("job %s waited %.0fs; spilling over to %s", job.id, waited, tier.remote_url)
        return remote_runner(ctx, tier), "spillover"
    return local, None
