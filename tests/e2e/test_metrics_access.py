"""Who may read the metrics (issue 17): with `SDQ_METRICS_TOKEN` set, `/metrics` answers only
to `Authorization: Bearer <token>` (401 without one, 403 with another, as JSON errors); with
`SDQ_METRICS_PORT` set, the API's port has no `/metrics` and the metrics port serves them; the
benchmark tasks are registered on a worker only with `SDQ_BENCH=1`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.queue import GENERATE_TASK
from producer.api.app import NO_TOKEN, WRONG_TOKEN
from producer.servers import free_port
from tests.support import ROOT, spawn, stop, wait_until

TOKEN = "metrics-token-0123456789abcdef-0123"
#: Series every scrape has: the fleet collector's, read from the store.
FLEET = "sdq_queue_depth"


def start_api(
    env: dict[str, str], workdir: Path, name: str, **overrides: str
) -> tuple[str, subprocess.Popen[bytes]]:
    """An API process of its own with extra settings (the session's API has neither)."""
    port = free_port()
    log = workdir / f"api-{name}.log"
    argv = [sys.executable, "-m", "producer.cli", "api", "--port", str(port)]
    proc = spawn(argv, log, {**env, **overrides})
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, name, proc, log)
    return url, proc


def families(text: str) -> set[str]:
    return {family.name for family in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def token_api(env: dict[str, str], workdir: Path) -> Iterator[str]:
    url, proc = start_api(env, workdir, "metrics-token", SDQ_METRICS_TOKEN=TOKEN)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def port_api(env: dict[str, str], workdir: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    url, proc = start_api(env, workdir, "metrics-port", SDQ_METRICS_PORT=str(port))
    yield url, port
    stop(proc)


def scrape(url: str, authorization: str | None = None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return httpx.get(f"{url}/metrics", headers=headers, timeout=30)


@pytest.mark.parametrize("authorization", [None, "", "Bearer"])
def test_without_a_token_is_401(token_api: str, authorization: str | None) -> None:
    response = scrape(token_api, authorization)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"code": 401, "message": NO_TOKEN}
    assert FLEET not in response.text


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer wrong-token",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,  # the token without its scheme
    ],
)
def test_another_token_is_403(token_api: str, authorization: str) -> None:
    response = scrape(token_api, authorization)
    assert response.status_code == 403
    assert response.json() == {"code": 403, "message": WRONG_TOKEN}
    assert FLEET not in response.text


@pytest.mark.parametrize("authorization", [f"Bearer {TOKEN}", f"bearer {TOKEN}"])
def test_the_token_reads_the_metrics(token_api: str, authorization: str) -> None:
    response = scrape(token_api, authorization)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert FLEET in families(response.text)


def test_the_session_api_without_a_token_serves_them_to_anyone(api_url: str) -> None:
    """The control: without SDQ_METRICS_TOKEN the same scrape is 200."""
    response = scrape(api_url)
    assert response.status_code == 200 and FLEET in families(response.text)


def test_a_metrics_port_of_their_own(port_api: tuple[str, int]) -> None:
    url, port = port_api
    on_api = scrape(url)
    assert on_api.status_code == 404
    assert on_api.json() == {"code": 404, "message": "no such endpoint: GET /metrics"}
    assert FLEET not in on_api.text
    assert "/metrics" not in httpx.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    own = scrape(f"http://127.0.0.1:{port}")
    assert own.status_code == 200
    assert own.headers["content-type"].startswith("text/plain")
    assert FLEET in families(own.text)


def test_a_metrics_port_with_several_api_workers(env: dict[str, str], workdir: Path) -> None:
    """`sdq api --workers 2` with SDQ_METRICS_PORT: one port, served once, and the API up."""
    port, metrics_port = free_port(), free_port()
    log = workdir / "api-metrics-workers.log"
    argv = [sys.executable, "-m", "producer.cli", "api", "--port", str(port), "--workers", "2"]
    proc = spawn(argv, log, {**env, "SDQ_METRICS_PORT": str(metrics_port)})
    url = f"http://127.0.0.1:{port}"
    try:
        # Both worker processes through their start-up (or one failed): uvicorn logs each.
        started = "Application startup complete."
        wait_until(
            lambda: log.read_text().count(started) == 2 or "startup failed" in log.read_text(),
            90,
            "api workers",
        )
        text = log.read_text(errors="replace")
        assert "startup failed" not in text, text[-2000:]
        assert proc.poll() is None
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        own = scrape(f"http://127.0.0.1:{metrics_port}")
        assert own.status_code == 200 and FLEET in families(own.text)
    finally:
        stop(proc)


def registered(tmp_path: Path, **extra: str) -> set[str]:
    """The Celery task names a worker process registers, with only ``extra`` as settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    env |= {"SDQ_ENV": "development", "SDQ_HOME": str(tmp_path / "home"), **extra}
    code = "import workers.tasks\nfrom workers.celery_app import app\nprint(*sorted(app.tasks))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return set(result.stdout.split())


BENCH = {"sdq.bench.noop", "sdq.bench.pipeline"}


def test_bench_tasks_only_with_sdq_bench(tmp_path: Path) -> None:
    serving = registered(tmp_path)
    assert GENERATE_TASK in serving
    assert not serving & BENCH
    assert registered(tmp_path, SDQ_BENCH="1") >= BENCH
    assert not registered(tmp_path, SDQ_BENCH="0") & BENCH
