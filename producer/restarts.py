"""The restart policy of sdq's supervisors (`sdq up`'s and `sdq api --workers`'s)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    """A process that dies is started again after ``first`` seconds, doubling to ``cap``
    while it keeps dying, and from ``first`` again once it stayed up ``stable_after``."""

    first: float = 1.0
    cap: float = 30.0
    stable_after: float = 60.0

    def delays(self, delay: float, uptime: float) -> tuple[float, float]:
        """The wait before this restart, given the last one's ``delay`` and how long the
        process stayed up, and the delay to keep for the next."""
        wait = self.first if uptime >= self.stable_after else delay
        return wait, min(wait * 2, self.cap)
