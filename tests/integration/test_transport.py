"""The Redis transport keeps one client per channel and still lands every message; the
messages the job store pushes are the ones Celery would send."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from common.queue import GENERATE_TASK, make_celery
from common.settings import Settings
from common.tiers import load_tiers
from common.transport import Transport, queue_key, task_message


def test_redis_broker_uses_the_transport(settings: Settings) -> None:
    assert settings.effective_broker_url.startswith("redis://")
    app = make_celery(settings, load_tiers())
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, Transport)
    amqp = make_celery(
        settings.model_copy(update={"broker_url": "amqp://guest:guest@127.0.0.1:1//"}),
        load_tiers(),
    )
    assert amqp.conf.broker_transport is None


def test_one_client_per_pool_and_messages_arrive(settings: Settings, rclient: redis.Redis) -> None:
    app = make_celery(settings, load_tiers())
    queue = "sdq.test.transport"
    rclient.delete(queue)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        first = channel._create_client()
        assert channel._create_client() is first
        with app.producer_or_acquire() as producer:
            for n in range(3):
                app.send_task("sdq.noop", args=[float(n)], queue=queue, producer=producer)
        channel._after_fork()  # kombu drops its pools after a fork: a new client follows
        second = channel._create_client()
        assert second is not first
        assert second.connection_pool is channel.pool
    messages = [json.loads(raw) for raw in rclient.lrange(queue, 0, -1)]
    assert sorted(m["headers"]["argsrepr"] for m in messages) == ["[0.0]", "[1.0]", "[2.0]"]
    rclient.delete(queue)


@pytest.mark.parametrize("priority", [0, 4, 9])
def test_task_message_is_what_send_task_writes(
    settings: Settings, rclient: redis.Redis, priority: int
) -> None:
    app = make_celery(settings, load_tiers())
    queue = "sdq.test.wire"
    rclient.delete(*[queue_key(queue, p) for p in range(10)])
    app.send_task(GENERATE_TASK, args=["job_x"], queue=queue, priority=priority)
    key, payload = task_message(GENERATE_TASK, ["job_x"], queue, priority)
    assert key == (queue if priority == 0 else f"{queue}:{priority}")
    (sent,) = [json.loads(raw) for raw in rclient.lrange(key, 0, -1)]
    ours = json.loads(payload)
    assert base64.b64decode(ours["body"]) == base64.b64decode(sent["body"])
    # Ids, the sender and the reply queue differ per message; everything else is the same.
    for message in (ours, sent):
        message.pop("body")
        for name in ("id", "root_id", "origin"):
            assert message["headers"].pop(name)
        for name in ("correlation_id", "delivery_tag"):
            assert message["properties"].pop(name)
        message["properties"].pop("reply_to")
    assert ours == sent
    rclient.delete(key)


def test_a_sweeper_that_dies_holding_the_restore_lock_blocks_others_10_s_at_most(
    settings: Settings, rclient: redis.Redis
) -> None:
    # kombu's sweep for expired unacked messages takes a lock; a worker killed while it
    # holds it (or a Valkey restart before the release) leaves it behind until it expires.
    app = make_celery(settings, load_tiers())
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        rclient.delete(channel.unacked_mutex_key)
        lock = rclient.lock(channel.unacked_mutex_key, timeout=channel.unacked_mutex_expire)
        assert lock.acquire(blocking=False)  # ... and never released: the holder died
        assert 0 < rclient.pttl(channel.unacked_mutex_key) <= 10_000
        rclient.delete(channel.unacked_mutex_key)
