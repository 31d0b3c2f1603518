"""API keys: stored hashed, looked up by hash, compared in constant time; credits per key.

An operator's changes (create, top up, set limits, disable, revoke, rotate the webhook secret)
each run in one atomic step that also writes the audit log (``common.audit``)."""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import json
import re
import secrets
import socket
import time
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from common import audit, lua
from common.errors import AuthError, Conflict, Forbidden, InvalidRequest, NotFound, RateLimited
from common.redis_keys import AUDIT_KEY, KEYS_INDEX, KEYS_INDEXED, apikey_by_hash_key, apikey_key

KEY_PREFIX = "sdq_"
#: What a key's id looks like.
KEY_ID = re.compile(r"^key_[0-9a-f]{16}$")
_HASH_KEY = re.compile(r"^sdq:apikey:(key_[0-9a-f]{16})$")
_LIST_CURSOR = re.compile(r"^\d{16}:key_[0-9a-f]{16}$")
#: The most credits a key may hold or be given at once: exact in Lua's doubles.
MAX_CREDITS = 10**12


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
    #: Refused (403) until enabled again; unlike a revocation, reversible.
    disabled: bool = False
    #: Jobs queued or running now, kept by the job store's Lua steps.
    active: int = 0
    #: The secret a rotation replaced: it still signs, beside the new one, until it expires.
    previous_webhook_secret: str | None = None
    previous_secret_expires_at: float | None = None
    webhook_secret_rotated_at: float | None = None

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

    def previous_expires(self, moment: float) -> float | None:
        """When the previous webhook secret stops signing; ``None`` once it has."""
        expires = self.previous_secret_expires_at
        if self.previous_webhook_secret and expires is not None and expires > moment:
            return expires
        return None

    def signing_secrets(self, moment: float) -> list[str]:
        """The secrets a delivery at ``moment`` is signed with: the current one, and the
        previous one during the overlap after a rotation."""
        previous = self.previous_webhook_secret
        if previous and self.previous_expires(moment) is not None:
            return [self.webhook_secret, previous]
        return [self.webhook_secret]

    def info(self) -> KeyInfo:
        """What an operator sees of the key: no digest, no secret."""
        return KeyInfo(
            id=self.id,
            name=self.name,
            credits=self.credits,
            created_at=self.created_at,
            rate=self.rate,
            max_jobs=self.max_jobs,
            max_priority=self.max_priority,
            models=self.models,
            revoked=self.revoked,
            disabled=self.disabled,
            active_jobs=self.active,
            webhook_secret_rotated_at=self.webhook_secret_rotated_at,
            previous_secret_expires_at=self.previous_expires(time.time()),
        )


class KeyInfo(BaseModel):
    """A key as the admin API and ``sdq keys`` show it. A limit of ``null`` takes the
    service's default."""

    id: str
    name: str
    credits: int
    created_at: float
    rate: float | None = Field(None, description="Requests a second; null: the default.")
    max_jobs: int | None = Field(None, description="Jobs queued or running; null: the default.")
    max_priority: int | None = Field(None, description="Highest priority; null: the default.")
    models: list[str] = Field(description="Models beyond the tiers' defaults it may ask for.")
    revoked: bool
    disabled: bool
    active_jobs: int = Field(description="Jobs it has queued or running now.")
    webhook_secret_rotated_at: float | None = None
    previous_secret_expires_at: float | None = Field(
        None, description="Until then the previous webhook secret signs too (after a rotation)."
    )


class KeyChanges(BaseModel):
    """What an operator changes on a key; a field left out stays as it is. ``null`` clears a
    limit (the default applies again)."""

    model_config = ConfigDict(extra="forbid")

    add_credits: int = Field(
        0,
        ge=-MAX_CREDITS,
        le=MAX_CREDITS,
        description="Added atomically (a top-up); negative to take credits back, never below 0.",
    )
    name: str | None = Field(None, max_length=200)
    rate: float | None = Field(None, gt=0, le=100_000)
    max_jobs: int | None = Field(None, ge=1, le=1_000_000)
    max_priority: int | None = Field(None, ge=0, le=9)
    models: list[str] | None = Field(None, max_length=50)
    disabled: bool | None = Field(None, description="true refuses the key (403) until false.")

    def stored(self) -> dict[str, str]:
        """The hash fields to write: only those given; a cleared limit is ``""``."""
        given = self.model_fields_set - {"add_credits"}
        values: dict[str, str] = {}
        for name in given:
            value = getattr(self, name)
            if name == "models":
                values[name] = ",".join(dict.fromkeys(value or []))
            elif name == "disabled":
                values[name] = "1" if value else "0"
            elif name == "name":
                values[name] = value or ""
            else:
                values[name] = "" if value is None else str(value)
        return values

    def audited(self) -> dict[str, Any]:
        """The changes as the audit log records them."""
        return self.model_dump(include=self.model_fields_set)


def operator() -> str:
    """Who runs this command, for the audit log: ``cli <user>@<host>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli {user}@{socket.gethostname()}"


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


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
    if record.disabled:
        raise Forbidden("this API key is disabled")
    return record


def _index_member(record: ApiKey) -> str:
    return f"{int(record.created_at * 1_000_000):016d}:{record.id}"


def _pairs(flat: list[Any]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class KeyStore:
    """Creates, authenticates, limits and revokes API keys in Redis."""

    def __init__(
        self,
        client: redis.Redis,
        default_rate: float = 20.0,
        *,
        audit_max: int = audit.MAX_ENTRIES,
    ) -> None:
        self.redis = client
        self.default_rate = default_rate
        #: Entries the audit log keeps.
        self.audit_max = audit_max
        self._auth = client.register_script(lua.source("auth"))
        self._update = client.register_script(lua.source("key_update"))
        self._rotate = client.register_script(lua.source("key_rotate"))

    def create(
        self,
        credits: int,
        name: str = "",
        *,
        rate: float | None = None,
        max_jobs: int | None = None,
        max_priority: int | None = None,
        models: list[str] | None = None,
        actor: str = "store",
    ) -> tuple[str, ApiKey]:
        """Make a new key with ``credits`` and optional limits of its own; returns the raw
        key (shown once) and its record. Recorded in the audit log as done by ``actor``."""
        if not 0 <= credits <= MAX_CREDITS:
            raise ValueError(f"credits must be between 0 and {MAX_CREDITS}")
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(
            id=f"key_{secrets.token_hex(8)}",
            name=name,
            digest=_digest(raw),
            credits=credits,
            created_at=time.time(),
            webhook_secret=new_webhook_secret(),
            rate=rate,
            max_jobs=max_jobs,
            max_priority=max_priority,
            models=models or [],
        )
        stored = record.model_dump(
            exclude_none=True, exclude={"revoked", "disabled", "active", "models"}
        )
        if record.models:
            stored["models"] = ",".join(record.models)
        items = [part for k, v in stored.items() for part in (k, str(v))]
        changes = record.info().model_dump(
            include={"name", "credits", "rate", "max_jobs", "max_priority", "models"}
        )
        with self.redis.pipeline() as pipe:
            pipe.hset(apikey_key(record.id), items=items)
            pipe.set(apikey_by_hash_key(record.digest), record.id)
            pipe.zadd(KEYS_INDEX, {_index_member(record): 0})
            pipe.xadd(
                AUDIT_KEY,
                {"entry": audit.entry("create", record.id, actor, changes)},
                maxlen=self.audit_max,
                approximate=False,
            )
            pipe.execute()
        return raw, record

    def page(self, *, limit: int, cursor: str | None = None) -> tuple[list[ApiKey], str | None]:
        """Keys newest first, ``limit`` of them after ``cursor``; and the next page's cursor
        (``None`` at the end). Stable while keys are created: a page never repeats one."""
        if cursor is not None and not _LIST_CURSOR.match(cursor):
            raise InvalidRequest("cursor: not a cursor this API gave out")
        self._backfill_index()
        top = "+" if cursor is None else f"({cursor}"
        members = cast(
            list[str], self.redis.zrevrangebylex(KEYS_INDEX, top, "-", start=0, num=limit + 1)
        )
        page = members[:limit]
        with self.redis.pipeline(transaction=False) as pipe:
            for member in page:
                pipe.hgetall(apikey_key(member.partition(":")[2]))
            rows = pipe.execute()
        found = [_record(row) for row in rows if row]
        return found, page[-1] if len(members) > limit else None

    def _backfill_index(self) -> None:
        """Index the keys made before the index existed, once."""
        if self.redis.exists(KEYS_INDEXED):
            return
        for name in self.redis.scan_iter(match="sdq:apikey:key_*", count=1000):
            matched = _HASH_KEY.match(str(name))
            created = matched and self.redis.hget(str(name), "created_at")
            if matched and created:
                member = f"{int(float(created) * 1_000_000):016d}:{matched.group(1)}"
                self.redis.zadd(KEYS_INDEX, {member: 0})
        self.redis.set(KEYS_INDEXED, "1")

    def update(self, key_or_id: str, changes: KeyChanges, *, actor: str = "store") -> ApiKey:
        """Apply an operator's ``changes`` in one atomic step with its audit entry: credits
        are added with an increment, so concurrent top-ups all count. 409 for a revoked key,
        or when the credits would go below zero."""
        record = self.find(key_or_id)
        plan = {
            "add_credits": changes.add_credits,
            "set": changes.stored(),
            "audit": audit.entry("update", record.id, actor, changes.audited()),
            "maxlen": self.audit_max,
        }
        reply = self._update(keys=[apikey_key(record.id), AUDIT_KEY], args=[json.dumps(plan)])
        return self._changed(record.id, reply)

    def revoke(self, key_or_id: str, *, actor: str = "store") -> ApiKey:
        """Revoke a key: every API process answers it 403 from its next request on (keys
        are read afresh on every request, never cached). Final: 409 when revoked already."""
        record = self.find(key_or_id)
        plan = {
            "add_credits": 0,
            "set": {"revoked": "1"},
            "audit": audit.entry("revoke", record.id, actor, {"revoked": True}),
            "maxlen": self.audit_max,
        }
        reply = self._update(keys=[apikey_key(record.id), AUDIT_KEY], args=[json.dumps(plan)])
        return self._changed(record.id, reply)

    def rotate_secret(
        self, key_or_id: str, overlap_seconds: float, *, actor: str = "store"
    ) -> ApiKey:
        """Give the key a new webhook secret; the old one signs too for ``overlap_seconds``
        (by the store's clock), so receivers can switch without losing a delivery."""
        record = self.find(key_or_id)
        changes = {"overlap_seconds": overlap_seconds}
        reply = self._rotate(
            keys=[apikey_key(record.id), AUDIT_KEY],
            args=[
                new_webhook_secret(),
                overlap_seconds,
                audit.entry("rotate-secret", record.id, actor, changes),
                self.audit_max,
            ],
        )
        return self._changed(record.id, reply)

    @staticmethod
    def _changed(key_id: str, reply: list[Any]) -> ApiKey:
        code = int(reply[0])
        if code == -1:
            raise NotFound(f"no API key {key_id}")
        if code == -2:
            raise Conflict(f"API key {key_id} was revoked: a revoked key cannot be changed")
        if code == -3:
            raise Conflict(
                f"API key {key_id} has {int(reply[1])} credits: they cannot go below zero"
            )
        return _record(_pairs(reply[1]))

    def get(self, key_id: str) -> ApiKey:
        data = cast(dict[str, str], self.redis.hgetall(apikey_key(key_id)))
        if not data:
            raise NotFound(f"no API key {key_id}")
        return _record(data)

    def find(self, key_or_id: str) -> ApiKey:
        """A key by its id (``key_...``) or by the raw key itself."""
        if len(key_or_id) > 256:
            raise NotFound("no such API key")
        if key_or_id.startswith(KEY_PREFIX):
            key_id = self.redis.get(apikey_by_hash_key(_digest(key_or_id)))
            if key_id is None:
                raise NotFound("no such API key")
            key_or_id = str(key_id)
        return self.get(key_or_id)

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key named by an ``Authorization`` header value (``KEY`` or ``Bearer KEY``),
        after spending one request of its rate."""
        digest = _digest(parse_authorization(authorization))
        return _admitted(
            digest, self._auth(keys=[apikey_by_hash_key(digest)], args=[self.default_rate])
        )

    def signing_secrets(self, key_id: str) -> list[str]:
        """The secrets a delivery for ``key_id`` is signed with now, by the store's clock:
        the current one, and the one a rotation replaced until its overlap ends."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(apikey_key(key_id))
            pipe.time()
            data, (seconds, micros) = pipe.execute()
        if not data:
            raise NotFound(f"no API key {key_id}")
        return _record(cast(dict[str, str], data)).signing_secrets(seconds + micros / 1e6)

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
        reply = await self._auth(keys=[apikey_by_hash_key(digest)], args=[self.default_rate])
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
