"""What sdq reads from HTTP answers the same way on every side: the ``Retry-After`` header,
for the webhook dispatcher, the Python client and the remote fallback."""

from __future__ import annotations

import email.utils
import re
from datetime import UTC, datetime

# delta-seconds (RFC 9110 10.2.3), and the fractions some servers send; ASCII digits only
# (str.isdigit also passes "²", which float() refuses).
_SECONDS = re.compile(r"[0-9]+\.?[0-9]*|\.[0-9]+")


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait: delta-seconds or an HTTP date (0 once
    that date has passed). ``None`` for no header, or one that is neither (a negative
    number, say). A huge number stays huge (``inf`` past a float's range): callers cap it."""
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
