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
from typing import Any

import uvicorn

from common.settings import Settings

log = logging.getLogger("sdq.api")

APP = "producer.api.app:create_app"
#: A process that dies is started again after 1 s, doubling to 30 s while it keeps dying;
#: back to 1 s once it stayed up a minute (as `sdq up` does).
RESTART_BACKOFF = (1.0, 30.0)
STAYED_UP_SECONDS = 60.0


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


class Supervisor:
    def __init__(self, args: tuple[Any, ...], workers: int) -> None:
        self.args = args
        self.workers = workers
        self.context = multiprocessing.get_context("spawn")
        self.stopping = threading.Event()

    def _start(self) -> tuple[multiprocessing.process.BaseProcess, float]:
        process = self.context.Process(target=_process, args=self.args, name="sdq-api")
        process.start()
        return process, time.monotonic()

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        host, port = self.args[:2]
        running = [self._start() for _ in range(self.workers)]
        delays = [RESTART_BACKOFF[0]] * self.workers
        due: list[float | None] = [None] * self.workers
        log.info("sdq api: %d processes on %s:%d (SO_REUSEPORT)", self.workers, host, port)
        while not self.stopping.wait(0.2):
            for index, (process, started) in enumerate(running):
                if process.is_alive():
                    continue
                now, when = time.monotonic(), due[index]
                if when is None:
                    if now - started >= STAYED_UP_SECONDS:
                        delays[index] = RESTART_BACKOFF[0]
                    log.warning(
                        "sdq api: process %s exited with %s; starting it again in %.0f s",
                        process.pid, process.exitcode, delays[index],
                    )  # fmt: skip
                    due[index] = now + delays[index]
                    delays[index] = min(RESTART_BACKOFF[1], delays[index] * 2)
                elif now >= when:
                    running[index], due[index] = self._start(), None
        for process, _ in running:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn's graceful shutdown
        for process, _ in running:
            process.join(15)
            if process.is_alive():
                process.kill()
                process.join()
