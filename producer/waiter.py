"""Waiting for a job to end without polling the store in a tight loop."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool

from common.errors import JobTimeout
from common.job import Job
from common.store import JobStore, events_channel

# A safety net: re-read the record this often even when no event arrives.
_POLL_SECONDS = 1.0


async def wait_for_end(client: aioredis.Redis, store: JobStore, job_id: str, timeout: float) -> Job:
    """The job once it is terminal; ``JobTimeout`` when it outlives ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    # Subscribe before the first read, so an event between the two is not missed.
    await pubsub.subscribe(events_channel(job_id))
    try:
        while True:
            job = await run_in_threadpool(store.get, job_id)
            if job.status.terminal:
                return job
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise JobTimeout(
                    f"job {job_id} is still {job.status.value} after {timeout:.0f}s; "
                    f"GET /v1/jobs/{job_id} for its result",
                    job_id=job_id,
                )
            await pubsub.get_message(timeout=min(remaining, _POLL_SECONDS))
    finally:
        await pubsub.aclose()
