"""Progress and cancel while the GPU runs behind Python: at most two steps of lag, and only
finished steps reported. A simulated device stands in for CUDA's queue and its events."""

from __future__ import annotations

import pytest

from workers.runahead import LAG, RunAhead


class Device:
    """A queue of steps that runs only when told to (``run``) or waited on (``synchronize``)."""

    def __init__(self) -> None:
        self.queued = 0
        self.done = 0
        self.waits = 0

    def event(self) -> StepEvent:
        return StepEvent(self)

    def run(self, steps: int) -> None:
        self.done = min(self.queued, self.done + steps)


class StepEvent:
    def __init__(self, device: Device) -> None:
        self.device = device
        self.at = 0

    def record(self) -> None:
        self.device.queued += 1
        self.at = self.device.queued

    def query(self) -> bool:
        return self.device.done >= self.at

    def synchronize(self) -> None:
        self.device.waits += 1
        self.device.done = max(self.device.done, self.at)


def test_a_slow_device_is_never_more_than_two_steps_behind() -> None:
    device = Device()
    reports: list[tuple[int, int]] = []

    def on_step(step: int, total: int) -> None:
        assert step <= device.done, "a step was reported before the device finished it"
        reports.append((step, total))

    ahead = RunAhead(on_step, device.event)
    for step in range(1, 31):
        ahead.step(step, 30)
        assert device.queued - device.done <= LAG
        assert ahead.queued - ahead.reported <= LAG
    assert ahead.max_lag == LAG == 2
    # The device always had the last steps queued: one wait per step past the lag, no more.
    assert device.waits == 30 - LAG
    ahead.finish()
    assert reports == [(step, 30) for step in range(1, 31)]


def test_a_device_that_keeps_up_has_every_step_reported_at_once() -> None:
    device = Device()
    reports: list[int] = []
    ahead = RunAhead(lambda step, total: reports.append(step), device.event)
    for step in range(1, 11):
        ahead.step(step, 10)
        device.run(1)
    ahead.finish()
    assert reports == list(range(1, 11))
    assert ahead.max_lag <= 1
    assert device.waits <= 1


def test_a_cancel_is_seen_within_two_steps() -> None:
    device = Device()
    canceled_at = 5

    class Canceled(Exception):
        pass

    def on_step(step: int, total: int) -> None:
        if step >= canceled_at:
            raise Canceled

    ahead = RunAhead(on_step, device.event)
    with pytest.raises(Canceled):
        for step in range(1, 31):
            ahead.step(step, 30)
    assert ahead.queued <= canceled_at + LAG


def test_on_the_cpu_every_step_is_reported_as_it_ends() -> None:
    reports: list[int] = []
    ahead = RunAhead(lambda step, total: reports.append(step))
    for step in range(1, 6):
        ahead.step(step, 5)
        assert reports[-1] == step
    assert ahead.max_lag == 0
