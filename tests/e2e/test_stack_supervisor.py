"""The stack's supervisor in the foreground: a worker killed with SIGKILL is restarted and
answers again, and Ctrl-C stops it all (the detached stack's restarts: test_stack.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_stack import SDQ, group_alive, process, ps, stack_env


@pytest.mark.timeout(300)
def test_foreground_up_restarts_a_killed_worker_and_ctrl_c_stops_it(
    tmp_path: Path, tiny_model: Path, other_models: dict[str, Path]
) -> None:
    home = tmp_path / "home"
    env = stack_env(home, tiny_model, other_models)
    output = tmp_path / "up.log"
    with open(output, "wb") as out:
        up = subprocess.Popen(
            [*SDQ, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    pids: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 240
        while "press Ctrl-C" not in output.read_text():
            assert up.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.2)
        pids = {p["name"]: p["pid"] for p in ps(env, tmp_path)["processes"]}
        os.kill(pids["worker-budget"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "worker-budget answers again" not in output.read_text():
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.2)
        text = output.read_text()
        assert "worker-budget (pid" in text and "restarting it in 1s" in text
        assert "worker-budget (pid" in (home / "logs" / "stack.log").read_text()
        pids["worker-budget"] = process(ps(env, tmp_path), "worker-budget")["pid"]
    finally:
        up.send_signal(signal.SIGINT)
        status = up.wait(90)
    assert status == 0, output.read_text()
    assert output.read_text().rstrip().endswith("stopped")
    assert [name for name, pid in pids.items() if group_alive(pid)] == []
    assert sorted(p.name for p in home.glob("*.json")) == []
