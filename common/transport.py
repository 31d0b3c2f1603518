"""kombu's Redis transport, reusing one client per channel; Celery task messages in its
wire format, so the job store can enqueue a job in the same atomic step that records it.

kombu builds a new ``redis.Redis`` for every publish and every ack (``conn_or_acquire``),
and redis-py fills about 170 response callbacks into each new client: py-spy and yappi put
that at a fifth of the API's CPU per submit. The connections were pooled already; this
keeps the client object too, and makes a new one only when kombu replaces its pool (after
a fork or a reconnect). Channels are not shared between threads (Celery's producer pool
hands each thread its own), and a redis-py client is thread-safe besides.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

from kombu.transport import redis as kombu_redis

#: kombu's ``sep`` and ``priority_steps`` transport options, as ``make_celery`` sets them.
PRIORITY_SEP = ":"
PRIORITY_STEPS = range(10)


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


def queue_key(queue: str, priority: int) -> str:
    """The Redis list that holds ``queue``'s messages of broker ``priority`` (0 first)."""
    assert priority in PRIORITY_STEPS, priority
    return f"{queue}{PRIORITY_SEP}{priority}" if priority else queue


def task_message(
    task: str,
    args: list[Any],
    queue: str,
    priority: int,
    limits: tuple[float, float] | None = None,
    task_id: str | None = None,
) -> tuple[str, str]:
    """Celery's protocol-2 message for ``task(*args)`` on ``queue``, as kombu's Redis
    transport stores it: the list key and the payload to LPUSH.

    This is what ``send_task`` would write (tests/integration/test_transport.py compares
    the two field by field); ``limits`` are its (hard, soft) time limits. Built by hand
    so the job store can push it from the Lua step that records and charges the job: a
    job is then either recorded and queued, or
    neither, with one round trip instead of two. Celery offers no way to publish inside
    another store's transaction.
    """
    task_id = task_id or str(uuid.uuid4())
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body = json.dumps([args, {}, embed]).encode()
    message = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": list(limits) if limits else [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr(args),
            "kwargsrepr": "{}",
            "origin": f"sdq-api{os.getpid()}@{_HOST}",
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return queue_key(queue, priority), json.dumps(message)


_HOST = socket.gethostname()
