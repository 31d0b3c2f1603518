"""A fresh checkout's stack, end to end, in one run (each `sdq up` costs half a minute on two
cores): `cp .env.example .env` (the docker compose step) stops `sdq up`, which names the one
setting and its .env line and starts nothing; fixed, `sdq up --detach` serves the seed's
request; the supervisor restarts an API killed with SIGKILL; `sdq ps` and `sdq down` work
from a subfolder and whatever the .env says, and leave nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.settings import Settings
from common.storage import S3Storage
from common.tiers import load_tiers
from producer.servers import free_port
from producer.stack import alive
from tests.support import ROOT

SDQ = [sys.executable, "-m", "producer.cli"]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def check_flower(port: int, job_id: str, auth: tuple[str, str] | None = None) -> None:
    """Flower's REST API (with the .env's basic auth): a worker per tier on its queue, and
    the job's task, which carries the job id and no prompt."""
    base = f"http://127.0.0.1:{port}"
    workers = httpx.get(
        f"{base}/api/workers", params={"refresh": "true"}, auth=auth, timeout=30
    ).json()
    queues = {
        name.split("@")[0]: sorted(q["name"] for q in info.get("active_queues", []))
        for name, info in workers.items()
    }
    expected: dict[str, list[str]] = {tier.name: [tier.queue] for tier in load_tiers()}
    for tier, model, _lane, queue in load_tiers().lanes():
        if model != tier.default_model:  # one worker per other model, on every tier's lane
            expected.setdefault(f"budget+normal.{model}", []).append(queue)
    assert queues == {name: sorted(names) for name, names in expected.items()}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        tasks = httpx.get(f"{base}/api/tasks", auth=auth, timeout=10).json()
        mine = [t for t in tasks.values() if job_id in str(t.get("args"))]
        if mine and mine[0]["state"] == "SUCCESS":
            break
        time.sleep(0.5)
    assert mine and mine[0]["name"] == "sdq.generate" and mine[0]["state"] == "SUCCESS", tasks
    assert "astronaut" not in json.dumps(tasks).lower()


def stack_env(
    home: Path | None, model: Path | None, others: dict[str, Path] | None = None
) -> dict[str, str]:
    """The environment of a stack of its own: free loopback ports, no SDQ_ variable of the
    caller's; SDQ_HOME and SDQ_MODEL only where given, and the session's tiny pipelines of
    the other models as ``others`` (``sdq up`` builds its own otherwise)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    env.update(
        SDQ_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        SDQ_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        SDQ_API_PORT=str(free_port()),
        SDQ_FLOWER_PORT=str(free_port()),
    )
    if home is not None:
        env["SDQ_HOME"] = str(home)
    if model is not None:
        env["SDQ_MODEL"] = str(model)
    if others:
        env["SDQ_MODEL_SOURCES"] = json.dumps({name: str(path) for name, path in others.items()})
    return env


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


def line_of(path: Path, prefix: str) -> int:
    return next(
        n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(prefix)
    )


def refused_by_the_compose_env(env: dict[str, str], project: Path) -> str:
    """`sdq up` with .env.example as the .env: refused, the setting and its line named, nothing
    started; returns the .env's text fixed as the message says."""
    env_file = project / ".env"
    env_file.write_text((ROOT / ".env.example").read_text())
    up = subprocess.run(
        [*SDQ, "up", "--detach"], env=env, cwd=project, capture_output=True, text=True, timeout=60
    )
    assert up.returncode == 1
    lines = [line for line in up.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, up.stderr
    where = f"SDQ_ENV=production (from {env_file}, line {line_of(env_file, 'SDQ_ENV=')})"
    assert lines[0].startswith(f"error: {where} stops worker-budget"), lines[0]
    assert "set SDQ_ENV=development there" in lines[0]
    assert not (project / ".sdq" / "stack.json").exists()
    # What the message says, and what the notes then say: the tiny model, not the hub's SDXL.
    text = env_file.read_text().replace("SDQ_ENV=production", "SDQ_ENV=development")
    return re.sub(r"^SDQ_(VAE_)?MODEL=.*$", "", text, flags=re.MULTILINE)


def serves_the_seed_request(env: dict[str, str], home: Path, stderr: str) -> None:
    """The seed's cURL request, with the key `sdq up` printed: a JPEG, the same bytes in S3,
    the job's task in Flower."""
    api_port, flower_port = int(env["SDQ_API_PORT"]), int(env["SDQ_FLOWER_PORT"])
    key = re.search(r"API key\s+(sdq_\S+)", stderr)
    assert key, stderr
    export = f"export SDQ_API_URL=http://127.0.0.1:{api_port} SDQ_API_KEY={key.group(1)}"
    assert export in [line.strip() for line in stderr.splitlines()], stderr
    response = httpx.post(
        f"http://127.0.0.1:{api_port}/stable-diffusion-normal",
        headers={"Authorization": key.group(1)},
        files={
            "inputText": (None, "An astronaut riding a horse on Mars"),
            "guidanceScale": (None, "10"),
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.content[:2] == b"\xff\xd8"
    # With the .env's S3 keys, which the stack's SeaweedFS was started with.
    settings = Settings(_env_file=home.parent / ".env", s3_endpoint_url=env["SDQ_S3_ENDPOINT_URL"])  # type: ignore[call-arg]
    s3 = S3Storage(settings)
    job_id = response.headers["x-job-id"]
    assert s3.get(f"images/{job_id}/0.jpg").body == response.content
    assert (home / "valkey" / "appendonlydir").is_dir()  # AOF on
    assert settings.flower_basic_auth is not None
    user, _, password = settings.flower_basic_auth.get_secret_value().partition(":")
    check_flower(flower_port, job_id, (user, password))


def restarts_a_killed_api(env: dict[str, str], home: Path, subfolder: Path) -> int:
    """SIGKILL the API: it answers again within 30 s, `sdq ps` (run from ``subfolder``) shows
    one restart of it and none of the others, and the stack's log says so. Its new pid."""
    api = f"http://127.0.0.1:{env['SDQ_API_PORT']}"
    killed = process(ps(env, subfolder), "api")["pid"]
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
    while process(ps(env, subfolder), "api")["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    api_now = process(ps(env, subfolder), "api")
    assert api_now["restarts"] == 1 and api_now["pid"] != killed
    assert api_now["url"] == api
    others = [p for p in ps(env, subfolder)["processes"] if p["name"] != "api"]
    assert [(p["name"], p["restarts"]) for p in others if p["restarts"]] == []
    table = subprocess.run(
        [*SDQ, "ps"], env=env, cwd=subfolder, capture_output=True, text=True, timeout=30
    )
    row = next(line.split() for line in table.stdout.splitlines() if line.startswith("api "))
    assert row[:4] == ["api", str(api_now["pid"]), "running", "1"] and row[-1] == api
    log = (home / "logs" / "stack.log").read_text()
    assert f"api (pid {killed}) exited with signal SIGKILL" in log
    assert "restarted api (restart 1" in log
    return int(api_now["pid"])


@pytest.mark.timeout(480)
def test_a_fresh_checkout_comes_up_serves_survives_a_killed_api_and_goes_down(
    tmp_path: Path, other_models: dict[str, Path]
) -> None:
    project = tmp_path / "checkout"
    subfolder = project / "docs" / "deep"
    subfolder.mkdir(parents=True)
    home = project / ".sdq"  # no SDQ_HOME: the .env's, found from a subfolder by walking up
    # Free ports over the .env's, as a second stack on one machine needs; the session's tiny
    # SD 1.5 and 2.1 (`sdq up` builds the SDXL one); no GPU, whatever this machine has.
    env = {**stack_env(None, None, other_models), "CUDA_VISIBLE_DEVICES": ""}
    text = refused_by_the_compose_env(env, project)
    (project / ".env").write_text(text)

    up = subprocess.run(
        [*SDQ, "up", "--detach"], env=env, cwd=project, capture_output=True, text=True, timeout=240
    )
    pids: dict[str, int] = {}
    supervisor: int | None = None
    try:
        assert up.returncode == 0, up.stderr
        assert "note:" not in up.stderr and "supervisor pid" in up.stderr
        assert '{"model"' not in up.stdout + up.stderr  # build-tiny's line is for scripts
        assert "building the tiny sdxl model" in up.stderr
        pids = json.loads((home / "stack.json").read_text())
        workers = {f"worker-{name}" for name in load_tiers().names} | {"worker-sd15", "worker-sd21"}
        assert set(pids) == {"valkey", "seaweedfs", "api", "flower", *workers}
        status = ps(env, subfolder)
        assert status["home"] == str(home) and status["supervisor_state"] == "running"
        assert {p["state"] for p in status["processes"]} == {"running"}
        supervisor = status["supervisor_pid"]
        serves_the_seed_request(env, home, up.stderr)
        pids["api"] = restarts_a_killed_api(env, home, subfolder)
        # The production .env back in place: it stops a start, never a running stack's ps/down.
        (project / ".env").write_text(text.replace("SDQ_ENV=development", "SDQ_ENV=production"))
        table = subprocess.run(
            [*SDQ, "ps"], env=env, cwd=project, capture_output=True, text=True, timeout=60
        )
        assert table.returncode == 0, table.stderr
        assert re.search(r"^api\s+\d+\s+running", table.stdout, re.M), table.stdout
    finally:
        down = subprocess.run(
            [*SDQ, "down"], env=env, cwd=subfolder, capture_output=True, text=True, timeout=90
        )
    assert down.returncode == 0, down.stderr
    assert "stopped: valkey" in down.stderr and "api" in down.stderr
    assert [name for name, pid in pids.items() if group_alive(pid)] == []
    assert supervisor is not None and not alive(supervisor)
    assert ps(env, subfolder)["processes"] == []
    assert sorted(p.name for p in home.glob("*.json")) == []
