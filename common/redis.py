"""Redis connections, one pool per URL and process."""

from __future__ import annotations

from functools import lru_cache

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


@lru_cache(maxsize=8)
def connect(url: str, retries: int = 20) -> redis.Redis:
    """A client with decoded responses, shared per URL. Commands ride out a restart of the
    server (connection errors, and LOADING while it replays its AOF) with backoff, about
    30 s in all by default."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError],
    )
