"""Creating and canceling work: validate against the tier, debit and record atomically,
enqueue by priority. An image-to-image job's input is stored before it is charged, and
deleted again when the charge is refused."""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import anyio
from celery import Celery

from common.apikeys import ApiKey
from common.errors import Conflict, Forbidden, InvalidRequest, NotFound, StorageError
from common.job import (
    DEFAULT_WEBHOOK_EVENTS,
    Job,
    JobRequest,
    JobStatus,
    new_job_id,
    now,
    random_seed,
)
from common.netguard import check_url
from common.queue import GENERATE_TASK, broker_priority, time_limits
from common.redis_keys import batch_key, idempotency_key
from common.settings import Settings
from common.storage import Storage, job_prefix
from common.store import Created, JobStore, Transition, request_digest
from common.styles import Styles, load_styles
from common.tiers import Tier, Tiers
from common.transport import task_message
from producer import images
from producer.images import InitImage

log = logging.getLogger(__name__)


def task_id_for(job_id: str, *, resend: bool = False) -> str:
    """A job's first message carries the job's id as its Celery task id, so Flower finds
    the job by it. A message the reconciler sends again needs an id of its own (a message's
    id records the job it took, `take.lua`), which keeps the job's id as its prefix."""
    return f"{job_id}.{uuid.uuid4().hex[:8]}" if resend else job_id


@dataclass
class _Plan:
    """What ``submit`` hands the job store."""

    jobs: list[Job]
    idempotency: tuple[str, str] | None
    record: dict[str, object] | None
    messages: list[tuple[str, str]] | None
    batch_id: str | None
    #: Each image-to-image job and its input, to store before the charge.
    inputs: list[tuple[Job, InitImage]] = field(default_factory=list)


@dataclass
class Submitted:
    jobs: list[Job]
    #: The key's credits after the debit; ``None`` when an Idempotency-Key replayed.
    credits: int | None
    replayed: bool = False
    batch_id: str | None = None


class JobService:
    """The producer's one way to create and cancel work."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        tiers: Tiers,
        celery: Celery,
        styles: Styles | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.tiers = tiers
        self.styles = styles or load_styles(settings.styles_file)
        #: Where image-to-image inputs go; without it such a job is refused (503).
        self.storage = storage
        self.celery = celery
        broker = settings.effective_broker_url
        #: When the broker is the job store's own Redis, a job's task message is pushed in
        #: the Lua step that charges and records it: queued means enqueued, even if this
        #: process dies between the two. Any other broker gets a publish just after.
        self.enqueue_in_store = broker == settings.redis_url and broker.startswith("redis://")

    def prepare(
        self,
        key: ApiKey,
        request: JobRequest,
        batch_id: str | None = None,
        image: InitImage | None = None,
    ) -> Job:
        """The job ``request`` would become, with tier defaults and limits applied. With
        ``image`` (the request's input, checked), the job is image-to-image: its output takes
        the input's size where the request names none, and its record keeps the input's
        object key, never the image."""
        tier = self.tiers.get(request.tier)
        if image is None and request.init_image is not None:
            image = images.from_base64(request.init_image, self.settings)
        style = None if request.style is None else self.styles.get(request.style)
        model = request.model or (style.model if style and style.model else tier.default_model)
        tier.serves(model)
        if not key.may_use(model, tier.default_model):
            raise Forbidden(
                f"model {model} is available upon request: this key is not entitled to it "
                f"(tier {tier.name} serves {tier.default_model} to every key)",
                model=model,
            )
        prompt, negative = request.prompt, request.negative_prompt
        if style is not None:
            prompt, negative = style.apply(prompt, negative)
            defaults = {
                "guidance_scale": style.guidance_scale,
                "steps": None if style.steps is None else min(style.steps, tier.max_steps),
            }
            # A style's defaults fill only what the request left unset.
            unset = {
                name: value
                for name, value in defaults.items()
                if value is not None and name not in request.model_fields_set
            }
            if unset:
                request = request.model_copy(update=unset)
        if image is not None:
            request = _sized_by(image, request, tier)
        steps = request.steps or tier.default_steps
        tier.check_limits(
            steps=steps, width=request.width, height=request.height, images=request.num_images
        )
        if request.webhook_url is not None:
            check_url(request.webhook_url, allow_loopback=self.settings.webhook_allow_loopback)
            if request.webhook_events is None:
                request = request.model_copy(update={"webhook_events": DEFAULT_WEBHOOK_EVENTS})
        ceiling = (
            self.settings.default_max_priority if key.max_priority is None else key.max_priority
        )
        job_id = new_job_id()
        return Job(
            id=job_id,
            key_id=key.id,
            tier=tier.name,
            status=JobStatus.QUEUED,
            request=request,
            seed=random_seed() if request.seed is None else request.seed,
            steps=steps,
            cost=tier.cost(request.num_images),
            priority=min(request.priority, ceiling),
            created_at=now(),
            batch_id=batch_id,
            model_id=model,
            lane=tier.lane(model),
            style=None if style is None else style.slug,
            prompt=prompt,
            negative_prompt=negative,
            init_image_key=None if image is None else images.input_key(self.settings, job_id),
        )

    def submit(
        self,
        key: ApiKey,
        requests: list[JobRequest],
        *,
        idempotency_key: str | None = None,
        batch: bool = False,
        init_images: Sequence[InitImage | None] | None = None,
    ) -> Submitted:
        """Charge, record and enqueue jobs, all or none.

        With an ``idempotency_key``, the same key and body return the jobs the first request
        made (and charge nothing); the same key with another body raises ``Conflict``.
        ``init_images`` are the requests' input images, checked already (a Hotpot form's
        file part); a request's base64 ``init_image`` is checked here otherwise.
        """
        plan = self._plan(key, requests, idempotency_key, batch, init_images)
        stored = self._store_inputs(key, plan, idempotency_key)
        try:
            created = self.store.create(
                plan.jobs, idempotency=plan.idempotency, batch=plan.record, messages=plan.messages
            )
        except BaseException:
            self._discard(stored)  # refused (credits, limits, conflict): no job reads them
            raise
        if created.replayed:
            self._discard(stored)
        return self._finish(plan, created)

    async def submit_async(
        self,
        key: ApiKey,
        requests: list[JobRequest],
        *,
        idempotency_key: str | None = None,
        batch: bool = False,
        init_images: Sequence[InitImage | None] | None = None,
    ) -> Submitted:
        """``submit`` for the event loop. The common case (no webhook URL, the store's own
        Redis as broker) runs the create script on the asyncio client; a webhook URL to
        resolve, a publish to another broker, an input image to check and store, or a
        replay to read takes a worker thread, as each blocks."""
        blocking = any(
            r.webhook_url is not None or r.init_image is not None for r in requests
        ) or any(image is not None for image in init_images or ())
        if not self.enqueue_in_store or blocking:
            return await anyio.to_thread.run_sync(
                partial(
                    self.submit,
                    key,
                    requests,
                    idempotency_key=idempotency_key,
                    batch=batch,
                    init_images=init_images,
                )
            )
        plan = self._plan(key, requests, idempotency_key, batch)
        created = await self.store.acreate(
            plan.jobs, idempotency=plan.idempotency, batch=plan.record, messages=plan.messages
        )
        if created.replayed:
            return await anyio.to_thread.run_sync(self._finish, plan, created)
        return self._finish(plan, created)

    def _plan(
        self,
        key: ApiKey,
        requests: list[JobRequest],
        idempotency_key: str | None,
        batch: bool,
        init_images: Sequence[InitImage | None] | None = None,
    ) -> _Plan:
        batch_id = f"batch_{secrets.token_hex(12)}" if batch else None
        inputs = self._input_images(requests, init_images, batch)
        jobs = [
            self.prepare(key, request, batch_id, image)
            for request, image in zip(requests, inputs, strict=True)
        ]
        idempotency = None
        if idempotency_key is not None:
            body = [_as_sent(r, image) for r, image in zip(requests, inputs, strict=True)]
            idempotency = (idempotency_key, request_digest({"batch": batch, "jobs": body}))
        record = None
        if batch_id is not None:
            record = {
                "id": batch_id,
                "key_id": key.id,
                "job_ids": [job.id for job in jobs],
                "created_at": jobs[0].created_at,
            }
        messages = [self.message(job) for job in jobs] if self.enqueue_in_store else None
        stored = [(job, image) for job, image in zip(jobs, inputs, strict=True) if image]
        return _Plan(jobs, idempotency, record, messages, batch_id, stored)

    def _input_images(
        self,
        requests: list[JobRequest],
        given: Sequence[InitImage | None] | None,
        batch: bool,
    ) -> list[InitImage | None]:
        """Each request's input image, checked: the one given, or its base64 ``init_image``
        decoded. A batch takes none: its inputs would be stored before an all-or-none charge
        that may refuse them all."""
        inputs: list[InitImage | None] = [None] * len(requests) if given is None else [*given]
        for index, request in enumerate(requests):
            if batch and (request.init_image is not None or inputs[index] is not None):
                raise InvalidRequest(
                    f"jobs.{index}.init_image: image-to-image is not accepted in batches; "
                    "send each such job to POST /v1/jobs"
                )
            if inputs[index] is None and request.init_image is not None:
                inputs[index] = images.from_base64(request.init_image, self.settings)
        return inputs

    def _store_inputs(self, key: ApiKey, plan: _Plan, token: str | None) -> list[str]:
        """Upload the plan's input images before the charge (a worker may take the job the
        moment it is queued); returns the object keys stored. Nothing is stored when the
        Idempotency-Key was seen: its create replays or conflicts without writing, so a
        retry neither uploads nor pays again."""
        if not plan.inputs:
            return []
        if token is not None and self.store.redis.exists(idempotency_key(key.id, token)):
            return []
        if self.storage is None:
            raise StorageError("image-to-image needs the object storage, which is not set up")
        stored: list[str] = []
        try:
            for job, image in plan.inputs:
                assert job.init_image_key is not None  # prepare set it
                images.store(self.storage, job.init_image_key, image)
                stored.append(job.init_image_key)
                log.info("job %s: input image %dx%d stored", job.id, image.width, image.height)
        except BaseException:
            self._discard(stored)
            raise
        return stored

    def _discard(self, object_keys: list[str]) -> None:
        if self.storage is not None:
            for object_key in object_keys:
                images.remove(self.storage, object_key)

    def _finish(self, plan: _Plan, created: Created) -> Submitted:
        """Read back a replay's jobs, or publish new ones to a broker other than the store."""
        if created.replayed:
            replayed = [job for job in self.store.get_many(created.job_ids) if job is not None]
            if not replayed:
                raise Conflict("the jobs of this Idempotency-Key have expired; use a new key")
            return Submitted(replayed, None, replayed=True, batch_id=replayed[0].batch_id)
        if plan.messages is None:
            self._publish(plan.jobs)
        return Submitted(plan.jobs, created.credits, batch_id=plan.batch_id)

    def message(self, job: Job, *, resend: bool = False) -> tuple[str, str]:
        """The job's task message as the store's Redis holds it: (list, payload)."""
        priority = broker_priority(job.priority, self.settings.effective_broker_url)
        tier = self.tiers.get(job.tier)
        limits = time_limits(tier, self.settings)
        task_id = task_id_for(job.id, resend=resend)
        queue = tier.queue_for(job.model_id)
        return task_message(GENERATE_TASK, [job.id], queue, priority, limits, task_id)

    def publish(self, job: Job, *, resend: bool = False) -> None:
        """Send the job's task message to a broker other than the store's Redis."""
        tier = self.tiers.get(job.tier)
        hard, soft = time_limits(tier, self.settings)
        self.celery.send_task(
            GENERATE_TASK,
            args=[job.id],
            task_id=task_id_for(job.id, resend=resend),
            queue=tier.queue_for(job.model_id),
            priority=broker_priority(job.priority, self.settings.effective_broker_url),
            time_limit=hard,
            soft_time_limit=soft,
        )

    def _publish(self, jobs: list[Job]) -> None:
        for job in jobs:
            try:
                self.publish(job)
            except Exception as exc:  # kombu raises several types when the broker is away
                # The jobs are charged and queued: the reconciler sends the messages that
                # are missing once the broker answers, so the answer stays the truth (202).
                log.warning("job %s: enqueue failed (%s); the reconciler will send it", job.id, exc)
                return

    def cancel(self, key: ApiKey, job_id: str) -> Transition:
        """Cancel a queued job at once, a running one within 0.1 s and one step; refunded
        once."""
        job = self.owned(key, job_id)
        outcome = self.store.cancel(job)
        if not outcome.applied:
            raise Conflict(f"job {job_id} is already {outcome.current.value}", job_id=job_id)
        return outcome

    def delete(self, key: ApiKey, job_id: str) -> None:
        """Delete a job of this key: its images and input first (so a storage outage leaves
        the job as it was, to delete again), then its record, events and webhooks. A queued
        or running job is canceled first, refunded once, as ``cancel`` does."""
        job = self.owned(key, job_id)
        if not job.status.terminal:
            self.store.cancel(job)  # refused only when it ended meanwhile: deleted as it ended
        if self.storage is not None:
            try:
                self.storage.delete_prefix(job_prefix(self.settings.s3_prefix, job_id))
            except StorageError as exc:
                log.error("job %s: its objects could not be deleted: %s", job_id, exc.message)
                raise StorageError(
                    "the object storage is unavailable: the job's images were not deleted; "
                    "try again"
                ) from None
        status = self.store.delete(job_id)
        if status is not None:  # queued again between the cancel and here: cannot happen
            raise Conflict(f"job {job_id} is {status.value}; try again", job_id=job_id)

    def owned(self, key: ApiKey, job_id: str) -> Job:
        """The job if this key owns it: another key's job is as absent as a missing one."""
        job = self.store.get(job_id)
        if job.key_id != key.id:
            raise NotFound(f"no job {job_id}")
        return job

    def batch(self, key: ApiKey, batch_id: str) -> tuple[dict[str, object], list[Job | None]]:
        raw = self.store.redis.get(batch_key(batch_id))
        if raw is None:
            raise NotFound(f"no batch {batch_id}")
        record: dict[str, object] = json.loads(raw)
        if record["key_id"] != key.id:
            raise NotFound(f"no batch {batch_id}")
        job_ids = record["job_ids"]
        assert isinstance(job_ids, list)
        return record, self.store.get_many(job_ids)


def _sized_by(image: InitImage, request: JobRequest, tier: Tier) -> JobRequest:
    """The request with its output size: the input's, rounded down to multiples of 8, on
    each side the request leaves unset; over the tier's limit, 400 saying how to resize."""
    natural_w, natural_h = image.output_size
    width = request.width or natural_w
    height = request.height or natural_h
    if (request.width is None and width > tier.max_side) or (
        request.height is None and height > tier.max_side
    ):
        raise InvalidRequest(
            f"{image.field}: the output takes the input's size, {width}x{height}, and tier "
            f"{tier.name} allows at most {tier.max_side} a side; send width and height to "
            "resize it"
        )
    return request.model_copy(update={"width": width, "height": height, "init_image": None})


def _as_sent(request: JobRequest, image: InitImage | None) -> dict[str, object]:
    """The request for an Idempotency-Key's digest: an input image counts by its digest, so
    the same image sent again, as base64 or as a file part, is the same request."""
    body: dict[str, object] = request.model_dump(mode="json")
    if image is not None:
        body["init_image"] = f"sha256:{image.sha256}"
    return body
