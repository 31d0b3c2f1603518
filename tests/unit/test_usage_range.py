"""The day range of a usage report: its defaults and bounds, at the calendar's edges too."""

from __future__ import annotations

from datetime import date

import pytest

from common.errors import InvalidRequest
from common.usage import MAX_DAYS, bounded_range


def test_the_default_is_the_thirty_days_to_the_end() -> None:
    assert bounded_range(None, date(2026, 12, 3)) == (date(2026, 11, 4), date(2026, 12, 3))


def test_a_range_at_the_start_of_the_calendar_begins_there() -> None:
    """A default start of 29 days earlier would fall before the calendar (a 500)."""
    assert bounded_range(None, date(1, 1, 1)) == (date(1, 1, 1), date(1, 1, 1))
    assert bounded_range(None, date(1, 1, 10)) == (date(1, 1, 1), date(1, 1, 10))


def test_a_reversed_or_too_long_range_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="is after"):
        bounded_range(date(2026, 12, 3), date(2026, 12, 1))
    with pytest.raises(InvalidRequest, match=f"at most {MAX_DAYS}"):
        bounded_range(date(1, 1, 1), date(9999, 12, 31))
