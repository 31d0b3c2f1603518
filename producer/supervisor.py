"""The stack's supervisor: restarts a service that dies, records what runs, stops it all.

``sdq up`` is the supervisor in the foreground; ``sdq up --detach`` starts one in a session of
its own (``serve_detached``) that reports to the command until the stack is healthy, then
supervises it alone. A service that dies is restarted by ``RestartPolicy``: after a backoff
that doubles from ``first_delay`` to ``max_delay``, and from ``first_delay`` again once the
service stayed up ``stable_after``. Its pid, and each service's state, are kept in
``<home>/supervisor.json``, which ``sdq ps`` reads and ``sdq down`` uses to stop it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from producer.restarts import RestartPolicy
from producer.stack import Service, Stack, StackError, alive, signal_group, stale, write_json

log = logging.getLogger(__name__)

State = Literal["starting", "running", "restarting", "exited"]
#: Exit status of a process that refused its settings (a worker on the wrong device, Flower
#: without auth): restarting it would only refuse again.
REFUSED = 2


@dataclass
class Watch:
    """What the supervisor knows of one service."""

    service: Service
    state: State = "running"
    restarts: int = 0
    delay: float = 0.0
    restart_at: float | None = None  # monotonic; set while it waits out its backoff
    died_at: float = 0.0
    exit_status: int | None = None


def _describe(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-status).name}"
    return f"status {status}"


class Supervisor:
    """Keeps a started stack's services running until it is told to stop."""

    def __init__(
        self,
        stack: Stack,
        *,
        first_delay: float = 1.0,
        max_delay: float = 30.0,
        stable_after: float = 60.0,
        interval: float = 0.25,
    ) -> None:
        self.stack = stack
        self.file = stack.home / "supervisor.json"
        self.first_delay = first_delay
        self.policy = RestartPolicy(first_delay, max_delay, stable_after)
        self.interval = interval
        self.started_at = time.time()
        self.watches: list[Watch] = []
        self.stopping = False

    def claim(self) -> None:
        """Record this process as the stack's supervisor (before anything starts, so that
        `sdq down` finds it even while the stack is starting)."""
        self.stack.home.mkdir(parents=True, exist_ok=True)
        self._write()

    def start(self, on_ready: Callable[[str], None]) -> None:
        """Start the stack. Until `run` takes over, SIGTERM (`sdq down` from another shell)
        raises KeyboardInterrupt, as Ctrl-C does: what was started is stopped again."""
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            services = self.stack.start(on_ready)
        except BaseException:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.release()
            raise
        self.watches = [Watch(s, delay=self.first_delay) for s in services]
        self._write()

    def run(self) -> None:
        """Restart what dies until SIGINT or SIGTERM, then stop every service."""

        def request_stop(signum: int, frame: FrameType | None) -> None:
            self.stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        try:
            while not self.stopping:
                if any([self.tick(watch) for watch in self.watches]):
                    self.stack.save([w.service for w in self.watches])
                    self._write()
                time.sleep(self.interval)
        finally:
            log.info("stopping the stack")
            self.stack.stop([w.service for w in self.watches])
            self.stack.close()
            self.release()

    def tick(self, watch: Watch) -> bool:
        """One look at one service; True when its state changed."""
        service = watch.service
        process = service.process
        assert process is not None
        now = time.monotonic()
        if watch.restart_at is not None:
            if now < watch.restart_at or self.stopping:
                return False
            self.stack.spawn(service)
            watch.restart_at = None
            watch.restarts += 1
            assert service.process is not None
            log.info(
                "restarted %s (restart %d, pid %d)",
                service.name,
                watch.restarts,
                service.process.pid,
            )
            return True
        status = process.poll()
        if status is not None:
            return self._died(watch, status, now)
        if watch.state == "restarting" and service.ready():
            watch.state = "running"
            log.info(
                "%s answers again (pid %d), %.1fs after it died",
                service.name,
                process.pid,
                now - watch.died_at,
            )
            return True
        return False

    def _died(self, watch: Watch, status: int, now: float) -> bool:
        if watch.state == "exited":
            return False
        service = watch.service
        assert service.process is not None
        # Its children (a Celery worker's pool) are orphans now: they go with it.
        signal_group(service.process.pid, signal.SIGKILL)
        uptime = time.time() - service.started_at
        watch.exit_status = status
        watch.died_at = now
        if status == REFUSED:
            watch.state = "exited"
            log.error(
                "%s exited with status 2 (it refused its settings; see %s): not restarting it",
                service.name,
                self.stack.logs / f"{service.name}.log",
            )
            return True
        wait, watch.delay = self.policy.delays(watch.delay, uptime)
        watch.state = "restarting"
        watch.restart_at = now + wait
        log.warning(
            "%s (pid %d) exited with %s after %.1fs up; restarting it in %gs",
            service.name,
            service.process.pid,
            _describe(status),
            uptime,
            wait,
        )
        return True

    def _write(self) -> None:
        write_json(
            self.file,
            {
                "pid": os.getpid(),
                "started_at": self.started_at,
                "services": [
                    {
                        "name": w.service.name,
                        "pid": w.service.process.pid if w.service.process else None,
                        "state": w.state,
                        "restarts": w.restarts,
                        "since": w.service.started_at,
                        "url": w.service.url,
                        "exit_status": w.exit_status,
                    }
                    for w in self.watches
                ],
            },
        )

    def release(self) -> None:
        self.file.unlink(missing_ok=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# --- what runs: `sdq ps`, `sdq down`, and the check `sdq up` makes first ---------------------


@dataclass
class ProcessStatus:
    name: str
    pid: int | None
    state: State
    restarts: int
    uptime_seconds: float | None
    url: str
    exit_status: int | None = None


@dataclass
class StackStatus:
    home: str
    supervisor_pid: int | None
    supervisor_state: Literal["running", "exited"] | None
    uptime_seconds: float | None
    processes: list[ProcessStatus]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _read(path: Path) -> dict[str, Any]:
    try:
        value: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value


def supervisor_pid(stack: Stack) -> int | None:
    """The pid of the stack's supervisor, while it runs."""
    path = stack.home / "supervisor.json"
    pid = None if stale(path) else _read(path).get("pid")
    return pid if isinstance(pid, int) and pid != os.getpid() and alive(pid) else None


def status(stack: Stack) -> StackStatus:
    """Each process of the stack in ``stack.home`` and its state, as its supervisor last
    recorded it (or, with no supervisor left, as the pids recorded say)."""
    recorded = _read(stack.home / "supervisor.json")
    pid = supervisor_pid(stack)
    now = time.time()
    processes: list[ProcessStatus] = []
    for entry in recorded.get("services", []) if pid else []:
        running = entry["state"] == "running"
        processes.append(
            ProcessStatus(
                name=entry["name"],
                pid=entry["pid"],
                state=entry["state"],
                restarts=entry["restarts"],
                uptime_seconds=round(now - entry["since"], 1) if running else None,
                url=entry["url"],
                exit_status=entry["exit_status"],
            )
        )
    if not processes:
        # Starting (the supervisor records its services once they are all up), or left
        # behind by a supervisor that is gone: what stack.json holds.
        since = {e["name"]: e for e in recorded.get("services", [])}
        for name, service_pid in stack.recorded().items():
            up = alive(service_pid)
            state: State = ("starting" if pid else "running") if up else "exited"
            processes.append(
                ProcessStatus(
                    name=name,
                    pid=service_pid,
                    state=state,
                    restarts=since.get(name, {}).get("restarts", 0),
                    uptime_seconds=None,
                    url=since.get(name, {}).get("url", ""),
                )
            )
    started = recorded.get("started_at")
    return StackStatus(
        home=str(stack.home),
        supervisor_pid=pid or recorded.get("pid"),
        supervisor_state=("running" if pid else "exited") if recorded else None,
        uptime_seconds=round(now - started, 1) if pid and started else None,
        processes=processes,
    )


def stop_stack(stack: Stack, timeout: float = 60.0) -> list[str]:
    """Stop the supervisor (which stops its services), then whatever it left running.
    Returns the names of the services that were running."""
    names = [name for name, pid in stack.recorded().items() if alive(pid)]
    pid = supervisor_pid(stack)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            log.warning("the supervisor (pid %d) ignored SIGTERM; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    stack.stop()  # what a supervisor that was killed left behind
    (stack.home / "supervisor.json").unlink(missing_ok=True)
    return names


def refuse_if_running(stack: Stack) -> None:
    """Raise StackError when this home already has a stack (or what is left of one)."""
    pid = supervisor_pid(stack)
    if pid is not None:
        raise StackError(
            f"a stack is already running in {stack.home} (supervisor pid {pid}): "
            "`sdq ps` shows it, `sdq down` stops it"
        )
    left = stack.running()
    if left:
        raise StackError(
            f"processes of a stack whose supervisor is gone still run ({', '.join(left)}, "
            f"in {stack.home}): `sdq down` stops them"
        )


# --- detached: a supervisor in a session of its own ------------------------------------------


def serve_detached(supervisor: Supervisor, report_fd: int) -> int:
    """The detached supervisor's life: start the stack, reporting each step on
    ``report_fd`` as JSON lines, close it once the stack is up, then supervise."""
    report = os.fdopen(report_fd, "w", buffering=1)

    def send(**message: object) -> None:
        with contextlib.suppress(OSError):  # the command that waits may be gone (Ctrl-C)
            report.write(json.dumps(message) + "\n")

    supervisor.claim()
    try:
        supervisor.start(on_ready=lambda name: send(ready=name))
    except StackError as exc:
        send(error=str(exc))
        return 1
    except KeyboardInterrupt:
        send(error="stopped while starting")
        return 1
    try:
        send(up=os.getpid())
        with contextlib.suppress(OSError):
            report.close()
    except KeyboardInterrupt:
        supervisor.stopping = True
    supervisor.run()
    return 0


def launch_detached(
    argv: list[str], env: dict[str, str], log_path: Path, on_ready: Callable[[str], None]
) -> dict[str, Any]:
    """Start ``argv`` (``sdq up``, given ``--report-fd N``) in a session of its own, its
    output appended to ``log_path``; pass on each service it reports ready, and return its
    last word: ``{"up": pid}``, ``{"error": message}`` or ``{"exited": status}``. An
    interrupt here stops it (and so what it started)."""
    read, write = os.pipe()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as output:
        process = subprocess.Popen(
            [*argv, "--report-fd", str(write)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=(write,),
            start_new_session=True,
        )
    os.close(write)
    try:
        with os.fdopen(read) as reports:
            for line in reports:
                message: dict[str, Any] = json.loads(line)
                if "ready" in message:
                    on_ready(message["ready"])
                else:
                    return message
    except BaseException:
        process.terminate()
        process.wait()
        raise
    # It died before it could say why: its log says.
    return {"exited": process.wait()}
