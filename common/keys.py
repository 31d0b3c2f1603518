"""API keys: stored hashed, looked up by hash, compared in constant time; credits per key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

import redis
import redis.asyncio as aioredis
from cachetools import TTLCache
from pydantic import BaseModel

from common.errors import AuthError, Forbidden, NotFound

KEY_PREFIX = "sdq_"


def apikey_key(key_id: str) -> str:
    return f"sdq:apikey:{key_id}"


def _hash_index_key(digest: str) -> str:
    return f"sdq:apikey-by-hash:{digest}"


def _digest(raw_key: str) -> str:
    # Keys carry 256 bits of randomness, so a plain SHA-256 is enough: there is nothing to
    # brute-force, and lookups stay O(1) by digest.
    return hashlib.sha256(raw_key.encode()).hexdigest()


class ApiKey(BaseModel):
    """A stored key: never the key itself, only its digest."""

    id: str
    name: str
    digest: str
    credits: int
    created_at: float
    webhook_secret: str


# The index lookup and the record read in one round trip: every request authenticates.
_LOOKUP = """
local id = redis.call('GET', KEYS[1])
if not id then return nil end
return redis.call('HGETALL', 'sdq:apikey:' .. id)
"""


def _verified(digest: str, fields: list[str] | None) -> ApiKey:
    if not fields:
        raise Forbidden()
    record = ApiKey.model_validate(dict(zip(fields[::2], fields[1::2], strict=True)))
    if not hmac.compare_digest(record.digest, digest):
        raise Forbidden()
    return record


class KeyStore:
    """Creates and authenticates API keys in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._lookup = client.register_script(_LOOKUP)

    def create(self, credits: int, name: str = "") -> tuple[str, ApiKey]:
        """Make a new key with ``credits``; returns the raw key (shown once) and its record."""
        if credits < 0:
            raise ValueError("credits must be >= 0")
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(
            id=f"key_{secrets.token_hex(8)}",
            name=name,
            digest=_digest(raw),
            credits=credits,
            created_at=time.time(),
            webhook_secret="whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
        )
        items = [part for k, v in record.model_dump().items() for part in (k, str(v))]
        with self.redis.pipeline() as pipe:
            pipe.hset(apikey_key(record.id), items=items)
            pipe.set(_hash_index_key(record.digest), record.id)
            pipe.execute()
        return raw, record

    def get(self, key_id: str) -> ApiKey:
        data = self.redis.hgetall(apikey_key(key_id))
        if not data:
            raise NotFound(f"no API key {key_id}")
        return ApiKey.model_validate(data)

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key named by an ``Authorization`` header value (``KEY`` or ``Bearer KEY``)."""
        digest = _digest(parse_authorization(authorization))
        return _verified(digest, self._lookup(keys=[_hash_index_key(digest)]))

    def add_credits(self, key_id: str, amount: int) -> int:
        self.get(key_id)
        return int(self.redis.hincrby(apikey_key(key_id), "credits", amount))

    def credits(self, key_id: str) -> int:
        value = self.redis.hget(apikey_key(key_id), "credits")
        if value is None:
            raise NotFound(f"no API key {key_id}")
        return int(value)


class AsyncKeyAuth:
    """``KeyStore.authenticate`` on an asyncio client, so the API's event loop checks keys
    without a hop to its thread pool.

    Known keys are remembered for ``ttl`` seconds: every request authenticates, and the
    lookup was a fifth of a submit's CPU. Nothing decided from the remembered record can go
    stale: credits are checked and debited by the job store's Lua step, which also refuses
    a key whose record was deleted, and ``/v1/account`` reads the record afresh. Unknown
    keys are never remembered, so guessing cannot fill the cache. One per event loop.
    """

    def __init__(self, client: aioredis.Redis, ttl: float = 5.0, size: int = 10_000) -> None:
        self._lookup = client.register_script(_LOOKUP)
        self._known: TTLCache[str, ApiKey] = TTLCache(maxsize=size, ttl=ttl)

    async def authenticate(self, authorization: str | None) -> ApiKey:
        digest = _digest(parse_authorization(authorization))
        record = self._known.get(digest)
        if record is None:
            record = _verified(digest, await self._lookup(keys=[_hash_index_key(digest)]))
            self._known[digest] = record
        return record


def parse_authorization(header: str | None) -> str:
    """The raw key from a header, accepting Hotpot's bare form and ``Bearer``."""
    value = (header or "").strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    if not value:
        raise AuthError()
    return value
