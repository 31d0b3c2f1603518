"""Waiting for a job to end on the process's event hub, without polling the store in a tight
loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from starlette.concurrency import run_in_threadpool

from common.errors import JobTimeout, SdqError
from common.job import Job
from common.store import JobStore
from producer.hub import RESYNC, Subscription

# A safety net, and how soon a client's disconnect is noticed: re-read the record this often
# even when no event arrives.
_POLL_SECONDS = 1.0


class ClientGone(SdqError):
    """The client hung up while waiting; the job goes on (``GET /v1/jobs`` lists it)."""

    status_code = 499
    message = "the client closed the connection"


async def wait_for_end(
    sub: Subscription,
    store: JobStore,
    job_id: str,
    timeout: float,
    *,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> Job:
    """The job once it is terminal; ``JobTimeout`` when it outlives ``timeout`` seconds,
    ``ClientGone`` as soon as ``disconnected()`` says so.

    ``sub`` must follow ``job_id`` already: subscribed before the first read, an event
    between the two is not missed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        job = await run_in_threadpool(store.get, job_id)
        if job.status.terminal:
            return job
        while True:
            if disconnected is not None and await disconnected():
                raise ClientGone(job_id=job_id)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise JobTimeout(
                    f"job {job_id} is still {job.status.value} after {timeout:.0f}s; "
                    f"GET /v1/jobs/{job_id} for its result",
                    job_id=job_id,
                )
            event = await sub.next(min(remaining, _POLL_SECONDS))
            # Progress (no seq) needs no read of the record; a status change, a resync or a
            # quiet second do.
            if event is None or event is RESYNC or "seq" in event:
                break
