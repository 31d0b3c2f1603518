"""Jobs written straight into the job store, for tests that drive a worker or the store."""

from __future__ import annotations

import json
from typing import Any

from common.apikeys import KeyStore
from common.job import Job, JobRequest, JobStatus, new_job_id, now
from common.redis_keys import job_key
from common.store import JobStore

#: A lane no tier has: the session's reconcilers send its jobs no message and no worker takes
#: them, so a test that runs a job itself is not raced by the session's worker.
PARKED = "normal.parked"


def queued_job(
    store: JobStore,
    keys: KeyStore,
    *,
    credits: int = 10,
    seed: int = 1,
    steps: int = 2,
    age: float = 0.0,
    model_id: str = "sdxl",
    lane: str = "",
    **fields: Any,
) -> Job:
    """A queued job of a new key with ``credits``, charged 2 credits an image, on the queue
    of ``model_id`` (the session's workers serve sdxl and sd15), or parked in ``lane``, one
    no tier has: no reconciler sends it a message, no worker takes it."""
    request = JobRequest.model_validate({"prompt": "a red kite", **fields})
    job = Job(
        id=new_job_id(),
        key_id=keys.create(credits)[1].id,
        tier=request.tier,
        status=JobStatus.QUEUED,
        request=request,
        seed=seed,
        steps=steps,
        cost=2 * request.num_images,
        created_at=now() - age,
        model_id=model_id,
        lane=lane,
    )
    store.create([job])
    if age:
        # The store stamps creation with its own clock; a test backdates it afterwards.
        job.created_at -= age
        store.redis.hset(job_key(job.id), "created_at", json.dumps(job.created_at))
    return job


def expire_lease(store: JobStore, job_id: str) -> None:
    """End a running job's lease now, as the death of its worker would, once it ran out."""
    store.redis.hset(f"sdq:job:{job_id}", "lease_until", "0")
    store.redis.zadd("sdq:running", {job_id: 0}, xx=True)
