"""API keys: stored hashed, looked up by hash, compared in constant time; credits per key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel, Field, field_validator

from common import lua
from common.errors import AuthError, Forbidden, NotFound, RateLimited

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
    """A stored key: never the key itself, only its digest. A limit left ``None`` takes the
    service's default (``SDQ_DEFAULT_*``)."""

    id: str
    name: str
    digest: str
    credits: int
    created_at: float
    webhook_secret: str
    rate: float | None = Field(None, gt=0, description="Requests a second (bursts of as many).")
    max_jobs: int | None = Field(None, ge=1, description="Jobs queued or running at once.")
    max_priority: int | None = Field(None, ge=0, le=9, description="Higher asks are capped.")
    models: list[str] = Field(
        default_factory=list,
        description="Models beyond each tier's default that it may ask for (upon request).",
    )
    revoked: bool = False
    #: Jobs queued or running now, kept by the job store's Lua steps.
    active: int = 0

    @field_validator("models", mode="before")
    @classmethod
    def _stored_as_text(cls, value: object) -> object:
        # The key's hash holds flat strings: the models as "sd15,sd21".
        if isinstance(value, str):
            return [part for part in value.split(",") if part]
        return value

    def may_use(self, model: str, default: str) -> bool:
        """Whether this key may ask for ``model`` on a tier whose default is ``default``."""
        return model == default or model in self.models


#: The fields an operator may set on a key after it was made.
LIMITS = ("rate", "max_jobs", "max_priority")


def _record(fields: list[str] | dict[str, str]) -> ApiKey:
    data = fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2], strict=True))
    # An operator clears a limit by setting it to "": the default applies again.
    return ApiKey.model_validate(
        {name: value for name, value in data.items() if value != "" or name not in LIMITS}
    )


def _verified(digest: str, record: ApiKey | None) -> ApiKey:
    if record is None or not hmac.compare_digest(record.digest, digest):
        raise Forbidden()
    if record.revoked:
        raise Forbidden("this API key was revoked")
    return record


class KeyStore:
    """Creates, authenticates, limits and revokes API keys in Redis."""

    def __init__(self, client: redis.Redis, default_rate: float = 20.0) -> None:
        self.redis = client
        self.default_rate = default_rate
        self._auth = client.register_script(lua.source("auth"))

    def create(
        self,
        credits: int,
        name: str = "",
        *,
        rate: float | None = None,
        max_jobs: int | None = None,
        max_priority: int | None = None,
        models: list[str] | None = None,
    ) -> tuple[str, ApiKey]:
        """Make a new key with ``credits`` and optional limits of its own; returns the raw
        key (shown once) and its record."""
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
            rate=rate,
            max_jobs=max_jobs,
            max_priority=max_priority,
            models=models or [],
        )
        stored = record.model_dump(exclude_none=True, exclude={"revoked", "active", "models"})
        if record.models:
            stored["models"] = ",".join(record.models)
        items = [part for k, v in stored.items() for part in (k, str(v))]
        with self.redis.pipeline() as pipe:
            pipe.hset(apikey_key(record.id), items=items)
            pipe.set(_hash_index_key(record.digest), record.id)
            pipe.execute()
        return raw, record

    def get(self, key_id: str) -> ApiKey:
        data = cast(dict[str, str], self.redis.hgetall(apikey_key(key_id)))
        if not data:
            raise NotFound(f"no API key {key_id}")
        return _record(data)

    def find(self, key_or_id: str) -> ApiKey:
        """A key by its id (``key_...``) or by the raw key itself."""
        if key_or_id.startswith(KEY_PREFIX):
            key_id = self.redis.get(_hash_index_key(_digest(key_or_id)))
            if key_id is None:
                raise NotFound("no such API key")
            key_or_id = str(key_id)
        return self.get(key_or_id)

    def revoke(self, key_or_id: str) -> ApiKey:
        """Revoke a key: every API process answers it 403 from its next request on (keys
        are read afresh on every request, never cached)."""
        record = self.find(key_or_id)
        self.redis.hset(apikey_key(record.id), "revoked", "1")
        return record.model_copy(update={"revoked": True})

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key named by an ``Authorization`` header value (``KEY`` or ``Bearer KEY``),
        after spending one request of its rate."""
        digest = _digest(parse_authorization(authorization))
        return _admitted(
            digest, self._auth(keys=[_hash_index_key(digest)], args=[self.default_rate])
        )

    def credits(self, key_id: str) -> int:
        value = self.redis.hget(apikey_key(key_id), "credits")
        if value is None:
            raise NotFound(f"no API key {key_id}")
        return int(value)


def _admitted(digest: str, reply: list[Any] | None) -> ApiKey:
    """The key of an ``auth.lua`` reply, or the error its request gets."""
    if not reply:
        raise Forbidden()
    fields, allowed, wait_ms, rate = reply
    record = _verified(digest, _record(fields))
    if not int(allowed):
        raise RateLimited(
            f"Rate limit exceeded: this key may make {float(rate):g} requests a second",
            retry_after=int(wait_ms) / 1000,
            rate_limit=f"{float(rate):g}",
        )
    return record


class AsyncKeyAuth:
    """``KeyStore.authenticate`` on an asyncio client, so the API's event loop checks keys
    without a hop to its thread pool. One round trip a request, which also spends the key's
    rate: nothing is cached, so a revoked key is refused at once on every process."""

    def __init__(self, client: aioredis.Redis, default_rate: float = 20.0) -> None:
        self._auth = client.register_script(lua.source("auth"))
        self.default_rate = default_rate

    async def authenticate(self, authorization: str | None) -> ApiKey:
        digest = _digest(parse_authorization(authorization))
        reply = await self._auth(keys=[_hash_index_key(digest)], args=[self.default_rate])
        return _admitted(digest, reply)


def parse_authorization(header: str | None) -> str:
    """The raw key from a header, accepting Hotpot's bare form and ``Bearer``."""
    value = (header or "").strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    if not value:
        raise AuthError()
    if len(value) > 256:
        raise Forbidden()
    return value
