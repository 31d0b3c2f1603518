"""Step reports that stay true while the GPU runs behind Python.

CUDA kernels are queued: the pipeline's step callback runs as soon as Python has queued a
step, while the device may still be several steps back (with CUDA graphs, a whole step is
one launch). A progress report made there claims work not done yet, and a cancel waits for
everything queued. ``RunAhead`` records an event after each step and, before a step is
reported, waits for the event ``lag`` steps back: the device is never more than ``lag``
steps behind the queue, only finished steps are reported, and the device never idles (it
always has the last ``lag`` steps queued; no full synchronize per step). On the CPU the
events are no-ops, already complete, and every step is reported at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

#: How many queued steps the device may lag behind Python.
LAG = 2


class Event(Protocol):
    """What ``torch.cuda.Event`` offers that this needs."""

    def record(self) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class DoneEvent:
    """The CPU's event: its work is done when Python returns."""

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def event_factory(device: str) -> Callable[[], Event]:
    """New events for steps queued on ``device``."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.Event
    return DoneEvent


class RunAhead:
    """Wraps a step callback ``on_step(step, total)``: call ``step`` where the pipeline
    ends a step, ``finish`` once it returned (its output is on the host: all done)."""

    def __init__(
        self,
        on_step: Callable[[int, int], None] | None,
        new_event: Callable[[], Event] = DoneEvent,
        lag: int = LAG,
    ) -> None:
        self.on_step = on_step
        self.new_event = new_event
        self.lag = lag
        self._pending: deque[tuple[int, int, Event]] = deque()
        #: The most steps queued beyond the last one reported, over the run.
        self.max_lag = 0
        self.queued = 0
        self.reported = 0

    def step(self, step: int, total: int) -> None:
        """Step ``step`` of ``total`` is queued: report what the device has finished."""
        event = self.new_event()
        event.record()
        self._pending.append((step, total, event))
        self.queued = step
        while len(self._pending) > self.lag:
            # The device is at most `lag` steps behind: wait for the step `lag` back.
            self._pending[0][2].synchronize()
            self._report()
        while self._pending and self._pending[0][2].query():
            self._report()
        self.max_lag = max(self.max_lag, self.queued - self.reported)

    def finish(self) -> None:
        """The pipeline returned: every queued step is done; report the rest."""
        while self._pending:
            self._pending[0][2].synchronize()
            self._report()

    def _report(self) -> None:
        step, total, _ = self._pending.popleft()
        self.reported = step
        if self.on_step is not None:
            self.on_step(step, total)
