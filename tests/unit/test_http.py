"""``Retry-After``: one parser for the dispatcher, the client and the remote fallback."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from common.http import retry_after


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("120", 120.0), ("0", 0.0), (" 7 ", 7.0), ("1.5", 1.5), (".5", 0.5), ("3.", 3.0)],
)
def test_delta_seconds(value: str, seconds: float) -> None:
    assert retry_after(value) == seconds


def test_http_date_in_the_future_is_the_seconds_until_it() -> None:
    when = datetime.now(UTC) + timedelta(seconds=90)
    wait = retry_after(format_datetime(when, usegmt=True))
    assert wait is not None and 85 <= wait <= 90


def test_http_date_in_the_past_is_no_wait() -> None:
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_http_date_without_a_zone_is_read_as_utc() -> None:
    when = (datetime.now(UTC) + timedelta(seconds=60)).strftime("%a, %d %b %Y %H:%M:%S -0000")
    wait = retry_after(when)
    assert wait is not None and 55 <= wait <= 60


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "-5", "-0.5", "1e3", "inf", "nan", "1.2.3", ".", "\u00b2", "5s",
     "Wed, 99 Oct 2015 07:28:00 GMT", "Mon, 01 Jan 99999 00:00:00 GMT"],
)  # fmt: skip
def test_garbage_and_negative_are_none(value: str | None) -> None:
    assert retry_after(value) is None


def test_huge_stays_huge_for_callers_to_cap() -> None:
    assert retry_after("86400000") == 86_400_000.0
    assert retry_after("9" * 400) == math.inf
