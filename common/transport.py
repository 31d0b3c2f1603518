"""kombu's Redis transport, reusing one client per channel.

kombu builds a new ``redis.Redis`` for every publish and every ack (``conn_or_acquire``),
and redis-py fills about 170 response callbacks into each new client: py-spy and yappi put
that at a fifth of the API's CPU per submit. The connections were pooled already; this
keeps the client object too, and makes a new one only when kombu replaces its pool (after
a fork or a reconnect). Channels are not shared between threads (Celery's producer pool
hands each thread its own), and a redis-py client is thread-safe besides.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


#: What ``broker_transport`` names for a ``redis://`` broker URL.
NAME = f"{__name__}:Transport"
