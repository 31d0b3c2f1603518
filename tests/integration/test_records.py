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
from tests.support import wait_until

#: A private address: the guard refuses it without DNS, so any attempt fails at once, for good.
HOOK = "https://10.0.0.1/sdq"


def stored(client: redis.Redis, delivery_id: str) -> dict[str, str]:
    return cast(dict[str, str], client.hgetall(delivery_key(delivery_id)))


def test_a_scheduled_delivery_reads_back_and_converts_both_ways(
    store: JobStore, keys: KeyStore, settings: Settings
) -> None:
    job = queued_job(store, keys, webhook_url=HOOK, webhook_events=["job.queued"])
    (delivery_id,) = store.redis.lrange(webhooks_key(job.id), 0, -1)
    fields = stored(store.redis, delivery_id)
    record = DeliveryRecord.from_hash(fields)  # a field the model lacks would raise
    assert (record.id, record.job_id, record.key_id) == (delivery_id, job.id, job.key_id)
    assert (record.event, record.url) == ("job.queued", HOOK)
    assert record.seq == 1 and record.progress is None
    assert record.first_at > 0
    if record.state == "pending" and record.attempts == 0:  # no dispatcher got to it yet
        assert record.next_at == record.first_at
        assert set(record.to_hash()) == set(fields)
    assert DeliveryRecord.from_hash(record.to_hash()) == record

    # After an attempt (this dispatcher's, or that of an API of the session that got there
    # first), the fields webhook_begin.lua and webhook_record.lua wrote read back too.
    dispatcher = Dispatcher(store.redis, settings)
    try:
        dispatcher.deliver(delivery_id)
    finally:
        dispatcher.close()
    wait_until(lambda: stored(store.redis, delivery_id)["state"] != "pending", 20, "the attempt")
    tried = DeliveryRecord.from_hash(stored(store.redis, delivery_id))
    assert tried.attempts == 1 and tried.state == "failed" and tried.last_error
    assert tried.inflight is None and tried.next_at is None
    assert DeliveryRecord.from_hash(tried.to_hash()) == tried
