"""The local stack's services: what ``sdq up`` starts, in which order, and how it stops them.

Each service runs in its own session (process group), so stopping a service stops its
children too (a Celery worker's pool, say). The pids are kept in ``<home>/stack.json`` so
``sdq down`` can stop a stack from another shell; ``producer.supervisor`` restarts a service
that dies.
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
from common.tiers import Tiers
from producer.servers import WeedPorts, valkey_argv, weed_argv

log = logging.getLogger(__name__)

#: The variables that size a worker's CPU thread pools (torch's, OpenMP's, MKL's).
THREAD_VARIABLES = ("SDQ_TORCH_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class StackError(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # wall clock of its last start


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


def worker_plan(tiers: Tiers) -> list[tuple[str, list[str], str | None]]:
    """The workers of the local stack, as (service name, tiers, model or None for the
    tiers' default): one per tier for its default model, and one per other model serving
    every tier that offers it, so that each lane has a worker on a small machine."""
    plan: list[tuple[str, list[str], str | None]] = [
        (f"worker-{tier.name}", [tier.name], None) for tier in tiers
    ]
    others: dict[str, list[str]] = {}
    for tier, model, _lane, _queue in tiers.lanes():
        if model != tier.default_model:
            others.setdefault(model, []).append(tier.name)
    plan += [(f"worker-{model}", names, model) for model, names in others.items()]
    return plan


def _worker_ready(app: Celery, node_name: str) -> Callable[[], bool]:
    node = f"{node_name}@{socket.gethostname()}"

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


def cores() -> int:
    """The cores this process may run on (its affinity, which honours cpusets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cpu_only() -> bool:
    try:
        from common.device import detect  # NVML only: no torch, no CUDA runtime
    except ImportError:
        return True
    return detect().count == 0


def thread_share(settings: Settings, workers: int, cpu: bool | None = None) -> int | None:
    """The torch threads each CPU worker of the stack gets: its share of the cores, at least
    one. None where the operator set SDQ_TORCH_THREADS, or the workers run on a GPU.

    torch starts one thread per core in every worker: two busy workers on one host then
    thrash each other's caches, each image many times slower."""
    if settings.torch_threads is not None or workers == 0:
        return None
    if not (_cpu_only() if cpu is None else cpu):
        return None
    return max(1, cores() // workers)


def thread_env(share: int | None) -> dict[str, str]:
    """The environment that gives a worker ``share`` threads; OMP_NUM_THREADS or
    MKL_NUM_THREADS the operator set are kept."""
    if share is None:
        return {}
    return {
        name: str(share)
        for name in THREAD_VARIABLES
        if name == "SDQ_TORCH_THREADS" or name not in os.environ
    }


class Stack:
    """The services of the embedded default, started in dependency order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.home
        self.logs = self.home / "logs"
        self.state_file = self.home / "stack.json"
        self.control: Celery | None = None  # pings the workers while they start

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    @property
    def flower_url(self) -> str:
        return f"http://{self.settings.flower_host}:{self.settings.flower_port}"

    def services(self) -> list[list[Service]]:
        """Groups of services; each group starts once the previous one is ready."""
        s = self.settings
        sdq = [sys.executable, "-m", "producer.cli"]
        # Every child resolves the same home, whatever folder it runs from.
        home = {"SDQ_HOME": str(self.home)}
        servers: list[Service] = []
        # A Redis or S3 that already answers is used as it is; one on loopback that does not
        # answer is started here, embedded. A remote one is never started.
        if _loopback(s.redis_url) and not _redis_ready(s.redis_url)():
            port = _port(s.redis_url, 6390)
            argv = valkey_argv(port, self._dir("valkey"))
            servers.append(Service("valkey", argv, _redis_ready(s.redis_url), s.redis_url))
        endpoint = s.s3_endpoint_url or ""
        if s.storage_backend == "s3" and _loopback(endpoint) and not _answers(endpoint):
            argv = weed_argv(
                WeedPorts.around(_port(endpoint, 8333)),
                self._dir("seaweedfs"),
                s.s3_access_key,
                s.s3_secret_key.get_secret_value(),
            )
            servers.append(Service("seaweedfs", argv, _bucket_ready(s), endpoint))
        from common.queue import make_celery
        from common.tiers import load_tiers

        tiers = load_tiers(s.tiers_file)
        # One app (one broker connection) for every readiness probe of every worker.
        control = self.control = make_celery(s, tiers)
        ready = _http_ready(f"{self.api_url}/readyz")
        apps = [Service("api", [*sdq, "api"], ready, self.api_url, dict(home))]
        workers = worker_plan(tiers)
        threads = thread_env(thread_share(s, len(workers)))
        for name, tier_names, model in workers:
            argv = [*sdq, "worker", *(f"--tier={tier}" for tier in tier_names)]
            node = "+".join(tier_names) + (f".{model}" if model else "")
            apps.append(
                Service(
                    name,
                    argv + ([f"--model={model}"] if model else []),
                    _worker_ready(control, node),
                    f"{node}@{socket.gethostname()}",
                    {**home, **threads},
                )
            )
        flower = _http_ready(f"{self.flower_url}/healthcheck")
        apps.append(Service("flower", [*sdq, "flower"], flower, self.flower_url, dict(home)))
        return [servers, apps]

    def _dir(self, name: str) -> Path:
        path = self.home / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def recorded(self) -> dict[str, int]:
        """The pids ``stack.json`` holds, alive or not (none from before the last boot: those
        pids now name other processes)."""
        if not self.state_file.exists() or stale(self.state_file):
            return {}
        pids: dict[str, int] = json.loads(self.state_file.read_text())
        return pids

    def running(self) -> dict[str, int]:
        """Pids of a stack started earlier that are still alive."""
        return {name: pid for name, pid in self.recorded().items() if alive(pid)}

    def start(self, on_ready: Callable[[str], None], timeout: float = 180.0) -> list[Service]:
        """Start every service, each group once the one before is ready. On any failure,
        or an interrupt, what was started is stopped again."""
        self.logs.mkdir(parents=True, exist_ok=True)
        started: list[Service] = []
        try:
            for group in self.services():
                for service in group:
                    self.spawn(service)
                    started.append(service)
                    self.save(started)
                self._wait_ready(group, timeout, on_ready)
        except BaseException:
            self.stop(started)
            self.close()
            raise
        return started

    def close(self) -> None:
        """Close the readiness probes' broker connection."""
        if self.control is not None:
            self.control.close()
            self.control = None

    def spawn(self, service: Service) -> None:
        """Start ``service`` in a session of its own, its output appended to its log."""
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
        service.started_at = time.time()
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
                    raise StackError(self._exited(service.name, service.process.returncode))
                if service.ready():
                    pending.remove(service)
                    on_ready(service.name)
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise StackError(f"not ready after {timeout:.0f}s: {names} (logs in {self.logs})")
            if pending:
                time.sleep(0.5)

    def _exited(self, name: str, status: int) -> str:
        if status == 2:
            # Status 2 is a refusal (a worker on the wrong device, Flower without auth): its
            # last line says why, and no traceback comes with it.
            lines = [line for line in self.tail(name).splitlines() if line.strip()]
            reason = lines[-1] if lines else "no reason logged"
            return f"{name} refused to start (status 2): {reason} (log {self.logs / name}.log)"
        return f"{name} exited with status {status}; its log ends with:\n{self.tail(name)}"

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def save(self, services: list[Service]) -> None:
        """Record the services' pids in ``stack.json``."""
        pids = {s.name: s.process.pid for s in services if s.process is not None}
        write_json(self.state_file, pids)

    def stop(self, services: list[Service] | None = None, grace: float = 20.0) -> list[str]:
        """Stop the given services (or those in the state file), newest first."""
        if services is not None:
            pids = {s.name: s.process.pid for s in services if s.process is not None}
        else:
            pids = self.running()
        for name, pid in reversed(list(pids.items())):
            signal_group(pid, signal.SIGTERM)
            log.debug("sent SIGTERM to %s (%d)", name, pid)
        # SeaweedFS's filer waits 15s for its gRPC streams to drain before it exits.
        deadline = time.monotonic() + grace
        for pid in pids.values():
            while group_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if group_alive(pid):
                log.warning("process group %d ignored SIGTERM; killing it", pid)
                signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        for pid in pids.values():
            while group_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        for service in services or []:
            if service.process is not None:
                service.process.wait()
        self.state_file.unlink(missing_ok=True)
        return list(pids)


def write_json(path: Path, value: object) -> None:
    """Write ``value`` to ``path`` atomically: a reader never sees half a file."""
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(value))
    partial.replace(path)


def stale(path: Path) -> bool:
    """Whether ``path`` was written before this machine last booted."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return path.stat().st_mtime < int(line.split()[1])
    except OSError:
        pass
    return False


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
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
        pass
    # Nor is someone else's zombie (an exited supervisor that init has yet to reap).
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_alive(pgid: int) -> bool:
    alive(pgid)  # reaps the leader if it is our own exited child
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
