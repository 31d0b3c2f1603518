"""The Redis transport keeps one client per channel and still lands every message."""

from __future__ import annotations

import json

import redis

from common.queue import make_celery
from common.settings import Settings
from common.tiers import load_tiers
from common.transport import Transport


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
