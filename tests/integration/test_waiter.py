"""Waiting for a job's end, and the event hub under it, against a real Valkey."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from common.apikeys import KeyStore
from common.errors import JobTimeout, RateLimited
from common.job import Job, JobStatus
from common.redis import connect_async
from common.redis_keys import events_channel
from common.store import JobStore
from producer.hub import RESYNC, Hub, HubFull
from producer.waiter import ClientGone, wait_for_end
from tests.factories import queued_job


def queued(store: JobStore, keys: KeyStore) -> Job:
    # Parked: the reconcilers of the session's APIs would send a job of a real lane a
    # message, and a worker could end it before a wait times out.
    return queued_job(store, keys, prompt="x", lane="budget.parked")


def with_hub(
    redis_url: str,
    body: Callable[[Hub], Awaitable[Any]],
    per_key: int = 5,
    per_process: int = 10,
    app_client: bool = False,
) -> Any:
    async def main() -> Any:
        if app_client:  # the API's own: redis-py reconnects and re-subscribes by itself
            client = connect_async(redis_url)
        else:
            client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        hub = Hub(client, per_key=per_key, per_process=per_process)
        await hub.start()
        try:
            return await asyncio.wait_for(body(hub), 20)
        finally:
            await hub.stop()
            await client.aclose()

    return asyncio.run(main())


def test_wakes_on_the_terminal_event(redis_url: str, store: JobStore, keys: KeyStore) -> None:
    job = queued(store, keys)
    threading.Timer(0.3, lambda: store.cancel(job)).start()

    async def body(hub: Hub) -> Job:
        async with hub.open(job.key_id) as sub:
            await sub.follow(job.id)
            return await wait_for_end(sub, store, job.id, timeout=10)

    assert with_hub(redis_url, body).status is JobStatus.CANCELED


def test_times_out_with_the_job_id(redis_url: str, store: JobStore, keys: KeyStore) -> None:
    job = queued(store, keys)

    async def body(hub: Hub) -> None:
        async with hub.open(job.key_id) as sub:
            await sub.follow(job.id)
            await wait_for_end(sub, store, job.id, timeout=0.3)

    with pytest.raises(JobTimeout) as info:
        with_hub(redis_url, body)
    assert info.value.details == {"job_id": job.id}
    assert "still queued" in info.value.message


def test_a_disconnected_client_stops_waiting(
    redis_url: str, store: JobStore, keys: KeyStore
) -> None:
    job = queued(store, keys)

    async def body(hub: Hub) -> tuple[int, int]:
        async def gone() -> bool:
            return True

        sub = hub.open(job.key_id)
        async with sub:
            await sub.follow(job.id)
            held = hub.open_count
            with pytest.raises(ClientGone):
                await wait_for_end(sub, store, job.id, timeout=10, disconnected=gone)
        return held, hub.open_count

    assert with_hub(redis_url, body) == (1, 0)
    assert store.get(job.id).status is JobStatus.QUEUED  # the job goes on


def test_one_connection_fans_out_and_unsubscribes_on_the_last(
    redis_url: str, store: JobStore, keys: KeyStore, rclient: redis.Redis
) -> None:
    jobs = [queued(store, keys) for _ in range(3)]
    channel = events_channel(jobs[0].id)

    async def body(hub: Hub) -> None:
        subs = [hub.open(f"key_{i}") for i in range(4)]
        for sub, job in zip(subs, [jobs[0], *jobs], strict=True):
            await sub.follow(job.id)
        assert rclient.pubsub_numsub(channel) == [(channel, 1)]  # one subscriber, two watchers
        await asyncio.to_thread(store.cancel, jobs[0])
        for sub in subs[:2]:
            event = await sub.next(5)
            assert event is not None and event["type"] == "job.canceled"
            assert event["seq"] == 2
        assert await subs[2].next(0.2) is None  # another job's watcher hears nothing
        await subs[0].close()
        assert rclient.pubsub_numsub(channel) == [(channel, 1)]
        await subs[1].close()
        await asyncio.sleep(0.1)
        assert rclient.pubsub_numsub(channel) == [(channel, 0)]
        for sub in subs[2:]:
            await sub.close()
        assert hub.open_count == 0

    with_hub(redis_url, body)


def test_caps_per_key_and_per_process(redis_url: str) -> None:
    async def body(hub: Hub) -> None:
        held = [hub.open("key_a"), hub.open("key_a")]
        with pytest.raises(RateLimited, match=r"too many open event streams for this key \(2\)"):
            hub.open("key_a")
        held += [hub.open("key_b"), hub.open("key_c")]
        with pytest.raises(HubFull) as info:
            hub.open("key_d")
        assert info.value.status_code == 503 and info.value.retry_after > 0
        await held.pop().close()
        held.append(hub.open("key_d"))
        for sub in held:
            await sub.close()
        assert hub.open_count == 0 and hub.held("key_a") == 0

    with_hub(redis_url, body, per_key=2, per_process=4)


@pytest.mark.parametrize("app_client", [True, False], ids=["retrying-client", "plain-client"])
def test_survives_a_reconnect(
    redis_url: str, store: JobStore, keys: KeyStore, rclient: redis.Redis, app_client: bool
) -> None:
    job = queued(store, keys)
    channel = events_channel(job.id)

    async def body(hub: Hub) -> None:
        async with hub.open(job.key_id) as sub:
            await sub.follow(job.id)
            assert rclient.client_kill_filter(_type="pubsub") >= 1
            # The watcher is told to re-read the job once the channel is subscribed again.
            assert await sub.next(10) is RESYNC
            assert rclient.pubsub_numsub(channel) == [(channel, 1)]
            await asyncio.to_thread(store.cancel, job)
            event = await sub.next(5)
            assert event is not None and event["type"] == "job.canceled"

    with_hub(redis_url, body, app_client=app_client)
