"""Redis connections, one pool per URL and process."""

from __future__ import annotations

from functools import lru_cache

import redis


@lru_cache(maxsize=8)
def connect(url: str) -> redis.Redis:
    """A client with decoded responses; connection pools are shared per URL."""
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)
