"""``sdq up`` / ``sdq down``: the whole local stack as child processes.

Each service runs in its own session (process group), so stopping a service stops its
children too (a Celery worker's pool, say). The pids are kept in ``<home>/stack.json`` so
``sdq down`` can stop a detached stack from another shell.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis
from celery import Celery

from common.settings import Settings
from common.storage import S3Storage
from producer.servers import WeedPorts, valkey_argv, weed_argv

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None


def _port(url: str, default: int) -> int:
    return urlparse(url).port or default


def _loopback(url: str) -> bool:
    return urlparse(url).hostname in ("127.0.0.1", "localhost", "::1")


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.HTTPError:
        return False


def _redis_ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    return check


def _http_ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def _worker_ready(app: Celery, tier: str) -> Callable[[], bool]:
    node = f"{tier}@{socket.gethostname()}"

    def check() -> bool:
        try:
            # limit=1: answer at the first pong instead of waiting out the timeout.
            return bool(app.control.ping(destination=[node], timeout=1.0, limit=1))
        except Exception:
            return False

    return check


def _bucket_ready(settings: Settings) -> Callable[[], bool]:
    def check() -> bool:
        try:
            S3Storage(settings).ensure_bucket()
            return True
        except Exception:
            return False

    return check


class Stack:
    """The services of the embedded default, started in dependency order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.home.resolve()
        self.logs = self.home / "logs"
        self.state_file = self.home / "stack.json"
        self.control: Celery | None = None  # pings the workers while they start
        # A Redis or S3 that already answers is used as it is; one on loopback that does not
        # answer is started here, embedded. A remote one is never started.
        self.embedded_redis = (
            _loopback(settings.redis_url) and not _redis_ready(settings.redis_url)()
        )
        endpoint = settings.s3_endpoint_url or ""
        self.embedded_s3 = (
            settings.storage_backend == "s3" and _loopback(endpoint) and not _answers(endpoint)
        )

    def services(self) -> list[list[Service]]:
        """Groups of services; each group starts once the previous one is ready."""
        s = self.settings
        sdq = [sys.executable, "-m", "producer.cli"]
        servers: list[Service] = []
        if self.embedded_redis:
            port = _port(s.redis_url, 6390)
            argv = valkey_argv(port, self._dir("valkey"))
            servers.append(Service("valkey", argv, _redis_ready(s.redis_url)))
        if self.embedded_s3:
            argv = weed_argv(
                WeedPorts.around(_port(s.s3_endpoint_url or "", 8333)),
                self._dir("seaweedfs"),
                s.s3_access_key,
                s.s3_secret_key.get_secret_value(),
            )
            servers.append(Service("seaweedfs", argv, _bucket_ready(s)))
        from common.queue import make_celery
        from common.tiers import load_tiers

        tiers = load_tiers(s.tiers_file)
        # One app (one broker connection) for every readiness probe of every worker.
        control = self.control = make_celery(s, tiers)
        api_url = f"http://{s.api_host}:{s.api_port}"
        apps = [Service("api", [*sdq, "api"], _http_ready(f"{api_url}/readyz"))]
        apps += [
            Service(
                f"worker-{tier}",
                [*sdq, "worker", "--tier", tier],
                _worker_ready(control, tier),
            )
            for tier in tiers.names
        ]
        apps.append(
            Service(
                "flower",
                [*sdq, "flower"],
                _http_ready(f"http://{s.flower_host}:{s.flower_port}/healthcheck"),
            )
        )
        return [servers, apps]

    def _dir(self, name: str) -> Path:
        path = self.home / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def running(self) -> dict[str, int]:
        """Pids of a stack started earlier that are still alive."""
        if not self.state_file.exists():
            return {}
        pids: dict[str, int] = json.loads(self.state_file.read_text())
        return {name: pid for name, pid in pids.items() if _alive(pid)}

    def start(self, on_ready: Callable[[str], None], timeout: float = 180.0) -> list[Service]:
        if self.running():
            raise StackError(f"a stack is already running (see {self.state_file}); run `sdq down`")
        self.logs.mkdir(parents=True, exist_ok=True)
        started: list[Service] = []
        try:
            for group in self.services():
                for service in group:
                    self._spawn(service)
                    started.append(service)
                    self._save(started)
                self._wait_ready(group, timeout, on_ready)
        except BaseException:
            self.stop(started)
            raise
        finally:
            if self.control is not None:
                self.control.close()
        return started

    def _spawn(self, service: Service) -> None:
        log_file = open(self.logs / f"{service.name}.log", "ab")  # noqa: SIM115 - the child owns it
        env = {**os.environ, **service.env}
        service.process = subprocess.Popen(
            service.argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log_file.close()

    def _wait_ready(
        self, group: list[Service], timeout: float, on_ready: Callable[[str], None]
    ) -> None:
        deadline = time.monotonic() + timeout
        pending = list(group)
        while pending:
            for service in list(pending):
                assert service.process is not None
                if service.process.poll() is not None:
                    raise StackError(
                        f"{service.name} exited with status {service.process.returncode}; "
                        f"its log ends with:\n{self.tail(service.name)}"
                    )
                if service.ready():
                    pending.remove(service)
                    on_ready(service.name)
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise StackError(f"not ready after {timeout:.0f}s: {names} (logs in {self.logs})")
            if pending:
                time.sleep(0.5)

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _save(self, services: list[Service]) -> None:
        pids = {s.name: s.process.pid for s in services if s.process is not None}
        self.state_file.write_text(json.dumps(pids))

    def stop(self, services: list[Service] | None = None, grace: float = 20.0) -> list[str]:
        """Stop the given services (or those in the state file), newest first."""
        if services is not None:
            pids = {s.name: s.process.pid for s in services if s.process is not None}
        else:
            pids = self.running()
        for name, pid in reversed(list(pids.items())):
            _signal_group(pid, signal.SIGTERM)
            log.debug("sent SIGTERM to %s (%d)", name, pid)
        # SeaweedFS's filer waits 15s for its gRPC streams to drain before it exits.
        deadline = time.monotonic() + grace
        for pid in pids.values():
            while _group_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _group_alive(pid):
                log.warning("process group %d ignored SIGTERM; killing it", pid)
                _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        for pid in pids.values():
            while _group_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        for service in services or []:
            if service.process is not None:
                service.process.wait()
        self.state_file.unlink(missing_ok=True)
        return list(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is not alive for our purposes.
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


def _group_alive(pgid: int) -> bool:
    _alive(pgid)  # reaps the leader if it is our own exited child
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
