"""Run the API under uvicorn: one process, or several, each with a listening socket of its own.

uvicorn's own ``--workers`` shares one listening socket between its processes, and the one
that wakes first accepts every waiting connection: with keep-alive clients, one process
serves nearly all of them while the others idle. Here each process binds the port with
``SO_REUSEPORT``, so the kernel spreads new connections evenly across them (what nginx's
``reuseport`` and gunicorn's ``reuse_port`` do). uvicorn has no such option, hence this
module: a small supervisor that restarts a process that dies, and stops them all on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from common.settings import Settings
from producer.restarts import RestartPolicy

log = logging.getLogger("sdq.api")

APP = "producer.api.app:create_app"


def serve(
    settings: Settings, host: str, port: int, workers: int, prepare: Callable[[], None]
) -> None:
    """Serve the API; ``prepare`` (a module-level function: it is pickled) sets up each
    spawned process, as the caller's own process was (logging)."""
    from producer.api.app import server_options

    options: dict[str, Any] = {"log_level": settings.log_level.lower(), **server_options(settings)}
    if workers == 1 or not hasattr(socket, "SO_REUSEPORT"):
        uvicorn.run(APP, factory=True, host=host, port=port, workers=workers, **options)
        return
    _check_port(host, port)
    Supervisor((host, port, options, prepare), workers).run()


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _check_port(host: str, port: int) -> None:
    """Fail at once, in the parent, when another program holds the port."""
    try:
        _reuse_port_socket(host, port).close()
    except OSError as exc:
        raise SystemExit(f"error: cannot listen on {host}:{port}: {exc.strerror}") from None


def _process(host: str, port: int, options: dict[str, Any], prepare: Callable[[], None]) -> None:
    """One API process (spawned): its own socket, its own uvicorn server."""
    prepare()
    sock = _reuse_port_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(APP, factory=True, host=host, port=port, **options))
    parent = os.getppid()

    def orphaned() -> None:  # a parent killed with -9 must not leave its processes serving
        while not server.should_exit:
            if os.getppid() != parent:
                server.should_exit = True
            time.sleep(1)

    threading.Thread(target=orphaned, name="parent-watch", daemon=True).start()
    server.run(sockets=[sock])


@dataclass
class _Slot:
    """One API process and where its restarts stand."""

    process: BaseProcess
    started: float
    delay: float
    restart_at: float | None = None


class Supervisor:
    def __init__(self, args: tuple[Any, ...], workers: int) -> None:
        self.args = args
        self.workers = workers
        self.policy = RestartPolicy()
        self.context = multiprocessing.get_context("spawn")
        self.stopping = threading.Event()

    def _start(self) -> BaseProcess:
        process = self.context.Process(target=_process, args=self.args, name="sdq-api")
        process.start()
        return process

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        host, port = self.args[:2]
        slots = [
            _Slot(self._start(), time.monotonic(), self.policy.first) for _ in range(self.workers)
        ]
        log.info("sdq api: %d processes on %s:%d (SO_REUSEPORT)", self.workers, host, port)
        while not self.stopping.wait(0.2):
            for slot in slots:
                if slot.process.is_alive():
                    continue
                now = time.monotonic()
                if slot.restart_at is None:
                    wait, slot.delay = self.policy.delays(slot.delay, now - slot.started)
                    slot.restart_at = now + wait
                    log.warning(
                        "sdq api: process %s exited with %s; starting it again in %.0f s",
                        slot.process.pid, slot.process.exitcode, wait,
                    )  # fmt: skip
                elif now >= slot.restart_at:
                    slot.process, slot.started, slot.restart_at = self._start(), now, None
        for slot in slots:
            if slot.process.is_alive():
                slot.process.terminate()  # SIGTERM: uvicorn's graceful shutdown
        for slot in slots:
            slot.process.join(15)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
