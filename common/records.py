"""Shapes the store keeps in Redis hashes that both the Lua steps and the Python read: each a
model with one pair of converters, to and from the hash. (A job's own hash is ``common.job``'s
``Job``, one JSON value per field: ``common.store.record_fields``.)"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict

DeliveryState = Literal["pending", "delivered", "failed", "gone"]


class DeliveryRecord(BaseModel):
    """A webhook delivery, ``sdq:webhook:<id>``: scheduled by ``lib.lua``'s ``schedule``
    with its event, then updated by ``webhook_begin.lua`` and ``webhook_record.lua`` as it is
    tried. Plain text values; an empty one means none. A field the steps write and this
    model lacks is an error, not ignored: the two must not drift apart."""

    model_config = ConfigDict(extra="forbid")

    id: str
    job_id: str
    key_id: str
    event: str
    url: str
    state: DeliveryState
    attempts: int = 0
    first_at: float
    next_at: float | None = None
    #: The event's timestamp, as the body says it.
    timestamp: str
    #: Where the body comes from at send time: the logged event's place in the job's log,
    #: or, for a progress event (not logged), the step itself as JSON.
    seq: int | None = None
    progress: str | None = None
    last_status: int | None = None
    last_error: str | None = None
    #: The attempt being sent and since when; a redelivery asked for meanwhile.
    inflight: int | None = None
    inflight_at: float | None = None
    redeliver: bool = False

    @classmethod
    def from_hash(cls, fields: Mapping[str, str]) -> DeliveryRecord:
        values: dict[str, object] = {k: v for k, v in fields.items() if v != ""}
        values["redeliver"] = fields.get("redeliver") == "1"
        return cls.model_validate(values)

    def to_hash(self) -> dict[str, str]:
        """The hash as the Lua steps write it: fields that hold nothing are left out."""
        fields: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if name == "redeliver":
                if value:
                    fields[name] = "1"
            elif value is not None:
                fields[name] = _text(value)
        return fields


def _text(value: object) -> str:
    # Lua writes integers without a decimal point; a float's repr is exact for the rest.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)
