"""Flower as an operator uses it: a job's id finds its Celery task, whose state follows the
job's (a canceled job's task is not shown as a success)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from producer.servers import free_port
from tests.support import spawn, stop, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def flower(env: dict[str, str], workdir: Path, api_url: str) -> Iterator[str]:
    port = free_port()
    log = workdir / "flower.log"
    argv = [sys.executable, "-m", "producer.cli", "flower", "--port", str(port)]
    proc: subprocess.Popen[bytes] = spawn(argv, log, env)
    url = f"http://127.0.0.1:{port}"

    def workers_seen() -> bool:
        return bool(httpx.get(f"{url}/api/workers", params={"refresh": "1"}, timeout=10).json())

    wait_until(workers_seen, 60, "flower", proc, log)
    yield url
    stop(proc)


def submit(api_url: str, key: str, **fields: Any) -> str:
    body = {"prompt": "a lighthouse", "tier": "budget", "width": 64, "height": 64, **fields}
    response = httpx.post(f"{api_url}/v1/jobs", json=body, headers={"Authorization": key})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def task(flower: str, task_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.get(f"{flower}/api/task/info/{task_id}", timeout=10)
        if response.status_code == 200:
            info = response.json()
            if info.get("state") == state:
                return info
        time.sleep(0.3)
    raise AssertionError(f"task {task_id} never reached {state}: {info}")


def test_a_job_id_is_its_task_id_and_a_canceled_job_is_no_success(
    flower: str, api_url: str, new_key
) -> None:
    key = new_key(50)
    slow = submit(api_url, key, steps=12)
    doomed = submit(api_url, key)
    canceled = httpx.post(f"{api_url}/v1/jobs/{doomed}/cancel", headers={"Authorization": key})
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"

    done = task(flower, slow, "SUCCESS")
    assert done["name"] == "sdq.generate" and done["args"] == repr([slow])
    assert done["result"] == repr(f"{slow} succeeded")
    revoked = task(flower, doomed, "REVOKED")
    assert revoked["args"] == repr([doomed]) and revoked["succeeded"] is None
