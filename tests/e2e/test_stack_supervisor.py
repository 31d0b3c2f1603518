"""The stack's supervisor: a process killed with SIGKILL is restarted and answers again,
`sdq ps` shows it, and `sdq down` from a subfolder (no SDQ_HOME) finds and stops it all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from producer.stack import alive
from tests.e2e.test_stack import SDQ, group_alive, stack_env


def ps(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    done = subprocess.run(
        [*SDQ, "ps", "--json"], env=env, cwd=cwd, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def process(status: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(p for p in status["processes"] if p["name"] == name)
    return found


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(300)
def test_a_killed_api_is_restarted_and_down_from_a_subfolder_stops_everything(
    tmp_path: Path, tiny_model: Path, other_models: dict[str, Path]
) -> None:
    project = tmp_path / "project"
    subfolder = project / "docs" / "deep"
    subfolder.mkdir(parents=True)
    home = project / ".sdq"
    env = stack_env(home, tiny_model, other_models)
    api = f"http://127.0.0.1:{env['SDQ_API_PORT']}"
    up = subprocess.run(
        [*SDQ, "up", "--detach"], env=env, cwd=project, capture_output=True, text=True, timeout=240
    )
    # From a subfolder of the project, with no SDQ_HOME: the home is found by walking up.
    nearby = {k: v for k, v in env.items() if k != "SDQ_HOME"}
    pids: dict[str, int] = {}
    supervisor = None
    try:
        assert up.returncode == 0, up.stderr
        assert "supervisor pid" in up.stderr
        before = ps(nearby, subfolder)
        assert before["home"] == str(home)
        assert before["supervisor_state"] == "running"
        supervisor = before["supervisor_pid"]
        assert {p["state"] for p in before["processes"]} == {"running"}
        pids = {p["name"]: p["pid"] for p in before["processes"]}
        killed = pids["api"]

        os.kill(killed, signal.SIGKILL)
        started = time.monotonic()
        deadline = started + 60
        while not answers(f"{api}/healthz") and time.monotonic() < deadline:
            time.sleep(0.05)
        seconds = time.monotonic() - started
        assert answers(f"{api}/healthz"), (home / "logs" / "stack.log").read_text()
        print(f"kill -9 of the API to /healthz answering again: {seconds:.2f}s")
        assert seconds < 30

        deadline = time.monotonic() + 15
        while process(ps(nearby, subfolder), "api")["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        api_now = process(ps(nearby, subfolder), "api")
        assert api_now["restarts"] == 1 and api_now["pid"] != killed
        assert api_now["url"] == api
        others = [p for p in ps(nearby, subfolder)["processes"] if p["name"] != "api"]
        assert [(p["name"], p["restarts"]) for p in others if p["restarts"]] == []
        pids["api"] = api_now["pid"]

        table = subprocess.run(
            [*SDQ, "ps"], env=nearby, cwd=subfolder, capture_output=True, text=True, timeout=30
        )
        row = next(line.split() for line in table.stdout.splitlines() if line.startswith("api "))
        assert row[:4] == ["api", str(api_now["pid"]), "running", "1"] and row[-1] == api
        log = (home / "logs" / "stack.log").read_text()
        assert f"api (pid {killed}) exited with signal SIGKILL" in log
        assert "restarted api (restart 1" in log
    finally:
        down = subprocess.run(
            [*SDQ, "down"], env=nearby, cwd=subfolder, capture_output=True, text=True, timeout=90
        )
    assert down.returncode == 0, down.stderr
    assert "stopped: valkey" in down.stderr and "api" in down.stderr
    assert [name for name, pid in pids.items() if group_alive(pid)] == []
    assert supervisor is not None and not alive(supervisor)
    assert ps(nearby, subfolder)["processes"] == []


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
