"""Submitting jobs: validate against the tier, debit and record atomically, enqueue."""

from __future__ import annotations

import logging

from celery import Celery

from common.errors import InvalidRequest, QueueUnavailable
from common.job import Job, JobRequest, JobStatus, new_job_id, now, random_seed
from common.keys import ApiKey
from common.queue import GENERATE_TASK
from common.store import JobStore
from common.tiers import Tiers

log = logging.getLogger(__name__)


class JobService:
    """The producer's one way to create work."""

    def __init__(self, store: JobStore, tiers: Tiers, celery: Celery) -> None:
        self.store = store
        self.tiers = tiers
        self.celery = celery

    def prepare(self, key: ApiKey, request: JobRequest) -> Job:
        """The job ``request`` would become, with tier defaults and limits applied."""
        tier = self.tiers.get(request.tier)
        steps = request.steps or tier.default_steps
        tier.check_limits(
            steps=steps, width=request.width, height=request.height, images=request.num_images
        )
        if request.webhook_url is not None:
            raise InvalidRequest("webhook_url: webhook delivery is not available in this version")
        return Job(
            id=new_job_id(),
            key_id=key.id,
            tier=tier.name,
            status=JobStatus.QUEUED,
            request=request,
            seed=random_seed() if request.seed is None else request.seed,
            steps=steps,
            cost=tier.cost(request.num_images),
            created_at=now(),
        )

    def submit(self, key: ApiKey, request: JobRequest) -> tuple[Job, int]:
        """Charge, record and enqueue a job; returns it and the key's credits left."""
        job = self.prepare(key, request)
        credits = self.store.create(job)
        try:
            self.celery.send_task(
                GENERATE_TASK, args=[job.id], queue=self.tiers.get(job.tier).queue
            )
        except Exception as exc:  # kombu raises several types when the broker is away
            log.error("job %s: enqueue failed: %s", job.id, exc)
            self.store.fail(job, "the job queue was unavailable")
            raise QueueUnavailable(job_id=job.id) from exc
        return job, credits
