"""A bench's own local stack: Valkey, SeaweedFS S3 and sdq processes on free loopback ports.

``bench/chaos.py`` and ``bench/hostile.py`` start one each. Every process runs in its own
session, so stopping it stops its children (a Celery worker's pool) too; logs go to
``<home>/<name>.log``. With another broker (RabbitMQ), ``OwnQueues`` gives the run queues of
its own, as the tests' ``broker`` fixture does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.settings import Settings  # noqa: E402
from common.storage import S3Storage  # noqa: E402
from producer.servers import WeedPorts, free_port, valkey_argv, weed_argv  # noqa: E402
from tests.support import wait_until  # noqa: E402

SDQ = [sys.executable, "-m", "producer.cli"]
T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.2f}s] {message}", flush=True)


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` that are alive (not zombies yet to be reaped), from
    /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, in bytes (VmRSS)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        pending += children(current)
    return total


class OwnQueues:
    """A broker's queues for one run: a tiers file naming them with ``prefix``, and their
    deletion at the end (``delete``)."""

    def __init__(self, url: str, home: Path, prefix: str) -> None:
        self.url = url
        self.tiers_file = home / "tiers.toml"
        builtin = (ROOT / "common" / "tiers.toml").read_text()
        self.tiers_file.write_text(builtin.replace('queue = "sdq.', f'queue = "{prefix}.'))
        self.env = {"SDQ_BROKER_URL": url, "SDQ_TIERS_FILE": str(self.tiers_file)}

    def delete(self) -> None:
        from kombu import Connection

        from common.tiers import load_tiers

        with Connection(self.url) as conn:
            channel = conn.channel()
            for tier in load_tiers(self.tiers_file):
                with contextlib.suppress(Exception):  # never declared: nothing to delete
                    channel.queue_delete(tier.queue)


class LocalStack:
    """The servers and sdq processes of one bench run, all under ``home``."""

    def __init__(self, home: Path, name: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.valkey_port = free_port()
        self.weed_ports = WeedPorts.around(free_port())
        self.api_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.valkey_port}/0"
        self.s3_url = f"http://127.0.0.1:{self.weed_ports.s3}"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.s3_access, self.s3_secret = name, f"{name}-secret"
        self.model_dir = home / "tiny-sdxl"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SDQ_")},
            "SDQ_ENV": "development",
            "SDQ_HOME": str(home),
            "SDQ_REDIS_URL": self.redis_url,
            "SDQ_S3_ENDPOINT_URL": self.s3_url,
            "SDQ_S3_ACCESS_KEY": self.s3_access,
            "SDQ_S3_SECRET_KEY": self.s3_secret,
            "SDQ_MODEL": str(self.model_dir),
            "SDQ_WEBHOOK_ALLOW_LOOPBACK": "1",
            "SDQ_LOG_LEVEL": "INFO",
            **(env or {}),
        }
        self.settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            redis_url=self.redis_url,
            s3_endpoint_url=self.s3_url,
            s3_access_key=self.s3_access,
            s3_secret_key=self.s3_secret,  # type: ignore[arg-type]
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        log.close()
        return proc

    def kill(self, name: str, sig: int = signal.SIGTERM, wait: float = 20) -> None:
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self, wait: float = 25) -> None:
        for name in list(self.procs):
            self.kill(name, wait=wait)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def build_model(self, reuse: Path | None = None) -> subprocess.Popen[bytes] | None:
        """Start building the tiny model (returns the build process), or point at ``reuse``."""
        if reuse is not None:
            self.model_dir = reuse
            self.env["SDQ_MODEL"] = str(reuse)
            return None
        return self.spawn("build-tiny", [*SDQ, "models", "build-tiny", str(self.model_dir)])

    def start_valkey(self) -> None:
        (self.home / "valkey").mkdir(parents=True, exist_ok=True)
        self.spawn("valkey", valkey_argv(self.valkey_port, self.home / "valkey"))
        wait_until(lambda: redis.Redis.from_url(self.redis_url).ping(), 20, "valkey")

    def start_s3(self, timeout: float = 60) -> None:
        argv = weed_argv(self.weed_ports, self.home / "weed", self.s3_access, self.s3_secret)
        proc = self.spawn("weed", argv)
        wait_until(
            lambda: S3Storage(self.settings).ensure_bucket() is None,
            timeout,
            "seaweedfs",
            proc,
            self.home / "weed.log",
        )

    def start_api(self, workers: int = 1, timeout: float = 60) -> None:
        self.spawn("api", [*SDQ, "api", "--port", str(self.api_port), "--workers", str(workers)])
        wait_until(
            lambda: httpx.get(f"{self.api_url}/readyz").status_code == 200,
            timeout,
            "api",
            self.procs["api"],
            self.home / "api.log",
        )
