"""Waiting for a job's end over pub/sub, against a real Valkey."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis.asyncio as aioredis

from common.errors import JobTimeout
from common.job import Job, JobStatus
from common.keys import KeyStore
from common.store import JobStore
from producer.waiter import wait_for_end
from tests.factories import queued_job


def queued(store: JobStore, keys: KeyStore) -> Job:
    return queued_job(store, keys, prompt="x")


def test_wakes_on_the_terminal_event(redis_url: str, store: JobStore, keys: KeyStore) -> None:
    job = queued(store, keys)
    threading.Timer(0.3, lambda: store.cancel(job)).start()

    async def main() -> Job:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            return await wait_for_end(client, store, job.id, timeout=10)
        finally:
            await client.aclose()

    assert asyncio.run(main()).status is JobStatus.CANCELED


def test_times_out_with_the_job_id(redis_url: str, store: JobStore, keys: KeyStore) -> None:
    job = queued(store, keys)

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            await wait_for_end(client, store, job.id, timeout=0.3)
        finally:
            await client.aclose()

    with pytest.raises(JobTimeout) as info:
        asyncio.run(main())
    assert info.value.details == {"job_id": job.id}
    assert "still queued" in info.value.message
