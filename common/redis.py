"""Redis connections, one pool per URL and process."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

_RETRY_ON = [redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError]


def _options(retry: type[Retry] | type[AsyncRetry], retries: int, timeout: float) -> dict[str, Any]:
    return {
        "decode_responses": True,
        "health_check_interval": 30,
        # A server that stops answering, or a connection dropped without a FIN, fails the
        # command after ``timeout`` (and is retried) instead of hanging it. Blocking pops and
        # pub/sub reads pass shorter timeouts of their own.
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, 5.0),
        "socket_keepalive": True,
        "retry": retry(ExponentialBackoff(cap=2.0, base=0.05), retries),
        "retry_on_error": _RETRY_ON,
    }


@lru_cache(maxsize=8)
def connect(url: str, retries: int = 20, timeout: float = 15.0) -> redis.Redis:
    """A client with decoded responses, shared per URL. Commands ride out a restart of the
    server (connection errors, and LOADING while it replays its AOF) with backoff, about
    30 s in all by default."""
    return redis.Redis.from_url(url, **_options(Retry, retries, timeout))


#: Connections one asyncio client opens at most; requests beyond wait for one to free.
ASYNC_POOL_SIZE = 200


def connect_async(url: str, retries: int = 20, timeout: float = 15.0) -> aioredis.Redis:
    """``connect`` for asyncio code, with the same retries. One per event loop: asyncio
    connections belong to the loop that made them, so this is not cached.

    The pool blocks when every connection is busy (for up to ``timeout``): redis-py's default
    asyncio pool raises ``MaxConnectionsError`` instead, which a burst of requests from one
    tenant turned into 500s for everyone."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=ASYNC_POOL_SIZE,
        timeout=timeout,
        **_options(AsyncRetry, retries, timeout),
    )
    return aioredis.Redis.from_pool(pool)
