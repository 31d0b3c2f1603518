"""``GET /v1/usage``: a key's own images and credits per UTC day and tier."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from common import usage
from common.usage import Report
from producer.api import openapi
from producer.api.deps import Key, State

router = APIRouter(prefix="/v1")

#: A range's answers beyond the caller's credentials.
RANGE_ERRORS: openapi.Responses = {
    400: openapi.error(
        400,
        "`from` or `to` is not a date (YYYY-MM-DD), `from` is after `to`, or the range is longer "
        f"than {usage.MAX_DAYS} days.",
        f"the range is 400 days: at most {usage.MAX_DAYS} in one request",
    ),
}


@dataclass(frozen=True)
class Range:
    start: date
    end: date


async def usage_range(
    start: Annotated[
        date | None,
        Query(
            alias="from", description="The first UTC day (YYYY-MM-DD); default 29 days before `to`."
        ),
    ] = None,
    end: Annotated[
        date | None, Query(alias="to", description="The last UTC day, included; default today.")
    ] = None,
) -> Range:
    """The days asked for, at most ``usage.MAX_DAYS`` of them (400 beyond)."""
    return Range(*usage.bounded_range(start, end))


Days = Annotated[Range, Depends(usage_range)]


@router.get(
    "/usage",
    response_model=Report,
    tags=["Account"],
    responses={**openapi.KEYED, **RANGE_ERRORS},
)
def key_usage(state: State, key: Key, days: Days) -> Report:
    """This key's usage per UTC day and tier: images made, credits debited (at submit),
    refunded (a job that failed or was canceled) and net. Every day of the range is listed,
    oldest first; counters are kept for a year."""
    return usage.read(state.store.redis, key.id, days.start, days.end)
