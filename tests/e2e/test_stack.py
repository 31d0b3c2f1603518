"""``sdq up --detach`` then ``sdq down``: the whole embedded stack, on free ports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from common.settings import Settings
from common.storage import S3Storage
from common.tiers import load_tiers
from producer.servers import free_port
from producer.stack import alive

SDQ = [sys.executable, "-m", "producer.cli"]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def check_flower(port: int, job_id: str) -> None:
    """Flower's REST API, unauthenticated on loopback: a worker per tier on its queue, and
    the job's task, which carries the job id and no prompt."""
    base = f"http://127.0.0.1:{port}"
    workers = httpx.get(f"{base}/api/workers", params={"refresh": "true"}, timeout=30).json()
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
        tasks = httpx.get(f"{base}/api/tasks", timeout=10).json()
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


def test_up_serves_the_seed_request_and_down_leaves_nothing(
    tmp_path: Path, tiny_model: Path, other_models: dict[str, Path]
) -> None:
    env = stack_env(tmp_path / "home", tiny_model, other_models)
    api_port, flower_port = int(env["SDQ_API_PORT"]), int(env["SDQ_FLOWER_PORT"])
    s3_port = int(env["SDQ_S3_ENDPOINT_URL"].rsplit(":", 1)[1])
    up = subprocess.run(
        [*SDQ, "up", "--detach"], env=env, capture_output=True, text=True, timeout=240
    )
    pids: dict[str, int] = {}
    supervisor: int | None = None
    try:
        assert up.returncode == 0, up.stderr
        state = tmp_path / "home" / "stack.json"
        pids = json.loads(state.read_text())
        workers = {f"worker-{name}" for name in load_tiers().names} | {"worker-sd15", "worker-sd21"}
        assert set(pids) == {"valkey", "seaweedfs", "api", "flower", *workers}
        key = re.search(r"API key\s+(sdq_\S+)", up.stderr)
        assert key, up.stderr
        export = f"export SDQ_API_URL=http://127.0.0.1:{api_port} SDQ_API_KEY={key.group(1)}"
        assert export in [line.strip() for line in up.stderr.splitlines()], up.stderr
        supervisor = json.loads((tmp_path / "home" / "supervisor.json").read_text())["pid"]
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
        settings = Settings(_env_file=None, s3_endpoint_url=f"http://127.0.0.1:{s3_port}")  # type: ignore[call-arg]
        job_id = response.headers["x-job-id"]
        assert S3Storage(settings).get(f"images/{job_id}/0.jpg").body == response.content
        assert (tmp_path / "home" / "valkey" / "appendonlydir").is_dir()  # AOF on
        check_flower(flower_port, job_id)
    finally:
        down = subprocess.run([*SDQ, "down"], env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert "stopped: valkey" in down.stderr
    assert [name for name, pid in pids.items() if group_alive(pid)] == []
    assert supervisor is None or not alive(supervisor)
    assert sorted(p.name for p in (tmp_path / "home").glob("*.json")) == []
