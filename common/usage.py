"""Usage per key and UTC day, and for the whole fleet: images made and credits debited and
refunded, by tier.

The counters are written by the job store's Lua steps, in the same atomic step as the charge
(``create.lua``), the refund and the success (``transition.lua``), so usage never disagrees
with the credits. Each day is a hash (``sdq:usage:key:<key id>:<day>``, and
``sdq:usage:fleet:<day>``) kept about 400 days, so a year can always be read back.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import cast

import redis
from pydantic import BaseModel, ConfigDict, Field

from common.errors import InvalidRequest
from common.redis_keys import usage_key

#: The longest range one request may read (a leap year).
MAX_DAYS = 366
#: How long a day's counters are kept (written by ``lib.lua``'s ``usage``).
RETENTION_DAYS = 400
_KINDS = ("images", "debited", "refunded")


class Counts(BaseModel):
    images: int = Field(0, description="Images made (jobs that succeeded).")
    debited: int = Field(0, description="Credits charged for jobs submitted.")
    refunded: int = Field(
        0, description="Credits given back for jobs that failed or were canceled."
    )
    net: int = Field(0, description="debited - refunded: what was spent.")

    def add(self, kind: str, amount: int) -> None:
        setattr(self, kind, getattr(self, kind) + amount)
        self.net = self.debited - self.refunded


class Day(BaseModel):
    date: date
    tiers: dict[str, Counts] = Field(description="By tier; tiers without use are left out.")
    total: Counts


class Report(BaseModel):
    """Usage over a range of UTC days, both ends included."""

    from_: date = Field(alias="from", serialization_alias="from")
    to: date
    key_id: str | None = Field(None, description="Whose usage; null for the whole fleet.")
    days: list[Day] = Field(description="Every day of the range, oldest first.")
    tiers: dict[str, Counts] = Field(description="The range's totals by tier.")
    total: Counts

    model_config = ConfigDict(populate_by_name=True)


def today() -> date:
    return datetime.now(UTC).date()


def bounded_range(start: date | None, end: date | None) -> tuple[date, date]:
    """The range asked for: by default the 30 days to today; at most ``MAX_DAYS`` long."""
    end = end or today()
    # The default start of a `to` in the first days of year 1 would be before the calendar.
    start = start or end - timedelta(days=min(29, (end - date.min).days))
    if start > end:
        raise InvalidRequest(f"from ({start}) is after to ({end})")
    if (end - start).days + 1 > MAX_DAYS:
        raise InvalidRequest(
            f"the range is {(end - start).days + 1} days: at most {MAX_DAYS} in one request"
        )
    return start, end


def read(client: redis.Redis, key_id: str | None, start: date, end: date) -> Report:
    """The usage of ``key_id`` (the fleet's for ``None``) from ``start`` to ``end``, read in
    one round trip."""
    start, end = bounded_range(start, end)
    days = [start + timedelta(days=n) for n in range((end - start).days + 1)]
    with client.pipeline(transaction=False) as pipe:
        for day in days:
            pipe.hgetall(usage_key(key_id, day))
        rows = cast(list[dict[str, str]], pipe.execute())
    by_tier: dict[str, Counts] = {}
    total = Counts()
    out = []
    for day, row in zip(days, rows, strict=True):
        tiers: dict[str, Counts] = {}
        day_total = Counts()
        for name, value in sorted(row.items()):
            tier, _, kind = name.rpartition(":")
            if kind not in _KINDS:
                continue
            amount = int(value)
            for counts in (
                tiers.setdefault(tier, Counts()),
                day_total,
                by_tier.setdefault(tier, Counts()),
                total,
            ):
                counts.add(kind, amount)
        out.append(Day(date=day, tiers=tiers, total=day_total))
    return Report(from_=start, to=end, key_id=key_id, days=out, tiers=by_tier, total=total)
