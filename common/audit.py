"""The audit log of operator actions on keys: a Redis stream, newest first, bounded.

Each entry is written by the same atomic step as the change it records (``common.apikeys``), so
an applied change is always recorded and a refused one never is. Entries say when, what, which
key, who and what changed; never a key, a digest or a webhook secret.
"""

from __future__ import annotations

import json
import re
from typing import Any, cast

import redis
from pydantic import BaseModel, Field

from common.errors import InvalidRequest
from common.redis_keys import AUDIT_KEY

#: Entries kept: older ones are trimmed as new ones are written.
MAX_ENTRIES = 10_000
#: A page's cursor: the stream id of the last entry shown.
_CURSOR = re.compile(r"^\d{1,20}-\d{1,20}$")


class AuditEntry(BaseModel):
    id: str = Field(description="The entry's id; pass it as `cursor` for the entries before it.")
    at: float = Field(description="When, in seconds since the epoch (the store's clock).")
    action: str = Field(description="create, update, revoke or rotate-secret.")
    key_id: str
    actor: str = Field(description="Who: `admin-api <client address>` or `cli <user@host>`.")
    changes: dict[str, Any] = Field(description="What changed, never a secret.")


def entry(action: str, key_id: str, actor: str, changes: dict[str, Any]) -> str:
    """An entry's stored form, for the step that makes the change to write."""
    return json.dumps({"action": action, "key_id": key_id, "actor": actor, "changes": changes})


def _parse(stream_id: str, fields: dict[str, str]) -> AuditEntry:
    data = json.loads(fields["entry"])
    return AuditEntry(id=stream_id, at=int(stream_id.split("-")[0]) / 1000, **data)


class AuditLog:
    """Reads the audit log."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def page(self, *, limit: int, cursor: str | None = None) -> tuple[list[AuditEntry], str | None]:
        """Entries newest first, ``limit`` of them from before ``cursor``; and the cursor of
        the next page (``None`` at the end)."""
        if cursor is not None and not _CURSOR.match(cursor):
            raise InvalidRequest("cursor: not a cursor this API gave out")
        top = "+" if cursor is None else f"({cursor}"
        rows = cast(
            list[tuple[str, dict[str, str]]],
            self.redis.xrevrange(AUDIT_KEY, max=top, min="-", count=limit + 1),
        )
        entries = [_parse(stream_id, fields) for stream_id, fields in rows[:limit]]
        more = len(rows) > limit
        return entries, entries[-1].id if more and entries else None
