"""The webhook delivery record: what the Lua steps write is what DeliveryRecord reads."""

from __future__ import annotations

from typing import cast

import redis

from common.apikeys import KeyStore
from common.records import DeliveryRecord
from common.redis_keys import delivery_key, webhooks_key
from common.settings import Settings
from common.store import JobStore
from common.webhooks import Dispatcher
from tests.factories import queued_job


def stored(client: redis.Redis, delivery_id: str) -> dict[str, str]:
    return cast(dict[str, str], client.hgetall(delivery_key(delivery_id)))


def test_a_scheduled_delivery_reads_back_and_converts_both_ways(
    store: JobStore, keys: KeyStore, settings: Settings
) -> None:
    job = queued_job(
        store,
        keys,
        webhook_url="https://hooks.example.com/sdq",
        webhook_events=["job.queued", "job.succeeded"],
    )
    (delivery_id,) = store.redis.lrange(webhooks_key(job.id), 0, -1)
    fields = stored(store.redis, delivery_id)
    record = DeliveryRecord.from_hash(fields)  # a field the model lacks would raise
    assert (record.id, record.job_id, record.key_id) == (delivery_id, job.id, job.key_id)
    assert (record.event, record.url, record.state) == (
        "job.queued",
        "https://hooks.example.com/sdq",
        "pending",
    )
    assert record.attempts == 0 and record.seq == 1 and record.progress is None
    assert record.first_at == record.next_at and record.first_at > 0
    assert set(record.to_hash()) == set(fields)
    assert DeliveryRecord.from_hash(record.to_hash()) == record

    # Once an attempt is under way, the fields webhook_begin.lua adds read back too.
    dispatcher = Dispatcher(store.redis, settings)
    try:
        assert dispatcher.begin(delivery_id) == 1
    finally:
        dispatcher.close()
    sending = DeliveryRecord.from_hash(stored(store.redis, delivery_id))
    assert sending.attempts == 1 and sending.inflight == 1 and sending.inflight_at
    assert DeliveryRecord.from_hash(sending.to_hash()) == sending
