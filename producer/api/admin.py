"""The admin API under ``/admin/v1``: keys, fleet usage and the audit log, for operators.

Every route takes ``Authorization: Bearer <SDQ_ADMIN_TOKEN>``, checked by ``RequestLimits``
before the body is read (and again here, for an app mounted without it), compared in constant
time. Without ``SDQ_ADMIN_TOKEN`` the admin API is off: every route answers 403 and says so.
Each change is recorded in the audit log by the same atomic step that makes it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from common import usage
from common.apikeys import KEY_ID, MAX_CREDITS, ApiKey, KeyChanges, KeyInfo
from common.audit import AuditEntry, AuditLog
from common.errors import AuthError, Forbidden, InvalidRequest, NotFound
from common.settings import Settings
from common.usage import Report
from producer.api import openapi
from producer.api.deps import State
from producer.api.state import AppState
from producer.api.usage import RANGE_ERRORS, Days

#: The spec's security scheme for these routes (Swagger's Authorize button); it only reads
#: the header, ``require_admin`` judges it.
ADMIN_TOKEN = HTTPBearer(
    scheme_name="AdminToken",
    description="The operator's `SDQ_ADMIN_TOKEN`: `Authorization: Bearer <token>`.",
    auto_error=False,
)

OFF = "the admin API is off: set SDQ_ADMIN_TOKEN to turn it on"
MISSING = "missing admin token: send Authorization: Bearer <SDQ_ADMIN_TOKEN>"
INVALID = "invalid admin token"


def check_admin(settings: Settings, authorization: str | None) -> None:
    """Refuse a request without the admin token: 403 when the admin API is off, 401 without
    a token, 403 with another."""
    if settings.admin_token is None:
        raise Forbidden(OFF)
    check_bearer(settings.admin_token, authorization, MISSING, INVALID)


def check_bearer(token: SecretStr, authorization: str | None, missing: str, invalid: str) -> None:
    """401 ``missing`` without a bearer token, 403 ``invalid`` with another than ``token``.
    Digests are compared, so neither the token nor its length leaks through timing."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    if not scheme or (scheme.lower() == "bearer" and not value.strip()):
        raise AuthError(missing)
    given = hashlib.sha256(value.strip().encode("utf-8", "surrogatepass")).digest()
    wanted = hashlib.sha256(token.get_secret_value().encode()).digest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, wanted):
        raise Forbidden(invalid)


def is_admin(settings: Settings, authorization: str | None) -> bool:
    """Whether a request carries the admin token (for details only it may see)."""
    try:
        check_admin(settings, authorization)
    except AuthError:
        return False
    return True


async def require_admin(
    request: Request,
    state: State,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(ADMIN_TOKEN)] = None,
) -> str:
    """The admin token's check; returns who acts, for the audit log."""
    check_admin(state.settings, request.headers.get("authorization"))
    client = request.client.host if request.client else "unknown"
    return f"admin-api {client}"


Actor = Annotated[str, Depends(require_admin)]

ADMIN_ERRORS: openapi.Responses = {
    401: openapi.error(401, "No admin token in the `Authorization` header.", MISSING),
    403: openapi.error(
        403, "The admin token is wrong, or the admin API is off (no `SDQ_ADMIN_TOKEN`).", INVALID
    ),
    **openapi.BODY_LIMITS,
}
_NO_KEY = openapi.error(404, "No key has this id.", "no API key key_0123456789abcdef")
_BAD = openapi.error(400, "A field is invalid: the message names it.", "rate: must be > 0")
_REVOKED = openapi.error(
    409,
    "The key was revoked (final), or its credits would go below zero.",
    "API key key_0123456789abcdef was revoked: a revoked key cannot be changed",
)
_KEYED: openapi.Responses = {**ADMIN_ERRORS, 404: _NO_KEY}
_PAGED: openapi.Responses = {
    **ADMIN_ERRORS,
    400: openapi.error(400, "A bad `limit` or `cursor`.", "cursor: not a cursor this API gave out"),
}
Limit = Annotated[int, Query(ge=1, le=200)]
Cursor = Annotated[str | None, Query(max_length=64)]

# The dependency on the router: no admin route can leave it out.
router = APIRouter(prefix="/admin/v1", tags=["Admin"], dependencies=[Depends(require_admin)])


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    credits: int | None = Field(
        None, ge=0, le=MAX_CREDITS, description="Credits it starts with; default SDQ_FREE_CREDITS."
    )
    name: str = Field("", max_length=200)
    rate: float | None = Field(None, gt=0, le=100_000)
    max_jobs: int | None = Field(None, ge=1, le=1_000_000)
    max_priority: int | None = Field(None, ge=0, le=9)
    models: list[str] = Field(default_factory=list, max_length=50)


class CreatedKey(KeyInfo):
    key: str = Field(description="The API key itself: shown this once, stored only hashed.")


class KeyPage(BaseModel):
    keys: list[KeyInfo]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


class KeyLookup(BaseModel):
    key: str = Field(max_length=256, description="An API key itself (`sdq_...`).")


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_seconds: float | None = Field(
        None,
        ge=0,
        le=30 * 86400,
        description="How long the old secret signs too; default "
        "SDQ_WEBHOOK_SECRET_OVERLAP_SECONDS. 0 stops it at once.",
    )


class RotatedSecret(BaseModel):
    id: str
    webhook_secret: str = Field(description="The new signing secret (`whsec_...`).")
    webhook_secret_rotated_at: float
    previous_secret_expires_at: float | None = Field(
        description="Until then deliveries carry a signature by the old secret too."
    )


class AuditPage(BaseModel):
    entries: list[AuditEntry] = Field(description="Newest first.")
    next_cursor: str | None = Field(None, description="Pass as `cursor` for older entries.")


def _checked_models(state: AppState, models: list[str]) -> list[str]:
    """Entitlements must name models of the models file."""
    for model in models:
        try:
            state.models.get(model)
        except InvalidRequest as exc:
            raise InvalidRequest(f"models: {exc.message}") from None
    return list(dict.fromkeys(models))


def _key(state: AppState, key_id: str) -> ApiKey:
    """A key by its id; a raw key never travels in a URL (``POST /keys/lookup`` takes it)."""
    if not KEY_ID.match(key_id):
        raise NotFound("no API key with this id: ids look like key_0123456789abcdef")
    return state.keys.get(key_id)


@router.post(
    "/keys", status_code=201, response_model=CreatedKey, responses={**ADMIN_ERRORS, 400: _BAD}
)
def create_key(body: NewKey, state: State, actor: Actor) -> CreatedKey:
    """Create an API key. Without `credits` it gets `SDQ_FREE_CREDITS`; a limit left out
    takes the service's default. The key itself is in this answer only."""
    credits = state.settings.free_credits if body.credits is None else body.credits
    raw, record = state.keys.create(
        credits,
        name=body.name,
        rate=body.rate,
        max_jobs=body.max_jobs,
        max_priority=body.max_priority,
        models=_checked_models(state, body.models),
        actor=actor,
    )
    return CreatedKey(key=raw, **record.info().model_dump())


@router.get(
    "/keys",
    response_model=KeyPage,
    responses=_PAGED,
)
def list_keys(
    state: State,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> KeyPage:
    """Every key, newest first, paged: pass `next_cursor` back as `cursor`."""
    found, next_cursor = state.keys.page(limit=limit, cursor=cursor)
    return KeyPage(keys=[record.info() for record in found], next_cursor=next_cursor)


@router.post("/keys/lookup", response_model=KeyInfo, responses={**ADMIN_ERRORS, 404: _NO_KEY})
def lookup_key(body: KeyLookup, state: State) -> KeyInfo:
    """A key found by the key itself (say, one that leaked), sent in the body, not the URL."""
    if not body.key.startswith("sdq_"):
        raise NotFound("no such API key")
    return state.keys.find(body.key).info()


@router.get("/keys/{key_id}", response_model=KeyInfo, responses=_KEYED)
def show_key(key_id: str, state: State) -> KeyInfo:
    """A key: its credits, limits, entitlements and state."""
    return _key(state, key_id).info()


@router.patch(
    "/keys/{key_id}", response_model=KeyInfo, responses={**_KEYED, 400: _BAD, 409: _REVOKED}
)
def update_key(key_id: str, body: KeyChanges, state: State, actor: Actor) -> KeyInfo:
    """Change a key: `add_credits` tops it up (an atomic increment, so concurrent top-ups all
    count; negative takes credits back, never below zero), `rate`, `max_jobs`,
    `max_priority` set its limits (`null`: the default again), `models` its entitlements,
    `name`, and `disabled` refuses it (403) until set false. Fields left out stay."""
    if not body.model_fields_set:
        raise InvalidRequest(
            "nothing to change: give add_credits, name, a limit, models or disabled"
        )
    if body.models is not None:
        body.models = _checked_models(state, body.models)
    return state.keys.update(_key(state, key_id).id, body, actor=actor).info()


@router.post("/keys/{key_id}/revoke", response_model=KeyInfo, responses={**_KEYED, 409: _REVOKED})
def revoke_key(key_id: str, state: State, actor: Actor) -> KeyInfo:
    """Revoke a key, for good: every API process answers it 403 from its next request on."""
    return state.keys.revoke(_key(state, key_id).id, actor=actor).info()


@router.post(
    "/keys/{key_id}/rotate-secret",
    response_model=RotatedSecret,
    responses={**_KEYED, 400: _BAD, 409: _REVOKED},
)
def rotate_secret(
    key_id: str, state: State, actor: Actor, body: Rotation | None = None
) -> RotatedSecret:
    """Give the key a new webhook signing secret. The old one keeps signing, beside the new,
    for `overlap_seconds` (default `SDQ_WEBHOOK_SECRET_OVERLAP_SECONDS`): every delivery
    meanwhile carries both signatures in `webhook-signature`, so receivers switch secrets
    without rejecting a delivery. The tenant reads the new one from `GET /v1/account`."""
    overlap = body.overlap_seconds if body and body.overlap_seconds is not None else None
    if overlap is None:
        overlap = state.settings.webhook_secret_overlap_seconds
    record = state.keys.rotate_secret(_key(state, key_id).id, overlap, actor=actor)
    assert record.webhook_secret_rotated_at is not None
    return RotatedSecret(
        id=record.id,
        webhook_secret=record.webhook_secret,
        webhook_secret_rotated_at=record.webhook_secret_rotated_at,
        previous_secret_expires_at=record.info().previous_secret_expires_at,
    )


@router.get("/keys/{key_id}/usage", response_model=Report, responses={**_KEYED, **RANGE_ERRORS})
def show_key_usage(key_id: str, state: State, days: Days) -> Report:
    """A key's usage per UTC day and tier, as it sees it in `GET /v1/usage`."""
    record = _key(state, key_id)
    return usage.read(state.store.redis, record.id, days.start, days.end)


@router.get("/usage", response_model=Report, responses={**ADMIN_ERRORS, **RANGE_ERRORS})
def fleet_usage(state: State, days: Days) -> Report:
    """The whole fleet's usage per UTC day and tier: images made, credits debited, refunded
    and net, over every key."""
    return usage.read(state.store.redis, None, days.start, days.end)


@router.get(
    "/audit",
    response_model=AuditPage,
    responses=_PAGED,
)
def audit_log(
    state: State,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> AuditPage:
    """Every change made to keys by operators (admin API or CLI), newest first: when, what,
    which key, who, and what changed (never a secret). The newest 10,000 are kept."""
    entries, next_cursor = AuditLog(state.store.redis).page(limit=limit, cursor=cursor)
    return AuditPage(entries=entries, next_cursor=next_cursor)
