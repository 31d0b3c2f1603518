"""The supervisor's restart policy on real short-lived processes: a backoff that doubles up
to its cap, starts over once a process stayed up a while, and no restart after a refusal."""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

import pytest

from common.settings import Settings
from producer.stack import Service, Stack
from producer.supervisor import Supervisor, Watch


def supervise(tmp_path: Path, code: str, seconds: float, **policy: float) -> Watch:
    """Run ``python -c code`` under a supervisor for ``seconds``; its watch at the end."""
    stack = Stack(Settings(_env_file=None, home=tmp_path))  # type: ignore[call-arg]
    stack.logs.mkdir(parents=True, exist_ok=True)
    service = Service("flaky", [sys.executable, "-c", code], ready=lambda: True)
    stack.spawn(service)
    supervisor = Supervisor(stack, **policy)
    watch = Watch(service, delay=supervisor.first_delay)
    supervisor.watches = [watch]
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            supervisor.tick(watch)
            time.sleep(0.02)
    finally:
        stack.stop([service], grace=2)
    return watch


def delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [
        float(m.group(1))
        for r in caplog.records
        if (m := re.search(r"restarting it in ([\d.]+)s", r.getMessage()))
    ]


def test_the_backoff_doubles_to_its_cap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "producer.supervisor")
    watch = supervise(tmp_path, "raise SystemExit(1)", 4.0, first_delay=0.1, max_delay=0.4)
    assert delays(caplog)[:5] == [0.1, 0.2, 0.4, 0.4, 0.4]
    assert watch.restarts >= 4
    assert any("exited with status 1" in r.getMessage() for r in caplog.records)


def test_the_backoff_starts_over_after_a_stable_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "producer.supervisor")
    code = "import time; time.sleep(0.5); raise SystemExit(1)"
    watch = supervise(tmp_path, code, 3.0, first_delay=0.1, max_delay=0.4, stable_after=0.4)
    assert watch.restarts >= 2
    assert set(delays(caplog)) == {0.1}


def test_a_refusal_is_not_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "producer.supervisor")
    watch = supervise(tmp_path, "raise SystemExit(2)", 1.5, first_delay=0.1)
    assert (watch.state, watch.restarts, watch.exit_status) == ("exited", 0, 2)
    assert any("not restarting it" in r.getMessage() for r in caplog.records)
