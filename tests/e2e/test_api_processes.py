"""`sdq api --workers N`: each process listens on the port itself, so connections spread
over all of them; one that dies is started again; SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from producer.servers import free_port
from tests.support import spawn, wait_until

WORKERS = 2
CONNECTIONS = 16


def children(pid: int) -> list[int]:
    """The API processes of ``sdq api`` (not multiprocessing's resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                found.append(int(entry))
    return found


def established(pid: int, port: int) -> int:
    """How many accepted connections on ``port`` the process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
            count += 1
    return count


@pytest.mark.timeout(240)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_processes_share_the_connections_restart_and_stop(
    env: dict[str, str], workdir: Path
) -> None:
    port = free_port()
    log = workdir / "api-processes.log"
    argv = [sys.executable, "-m", "producer.cli", "api", "--port", str(port)]
    proc = spawn([*argv, "--workers", str(WORKERS)], log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: len(children(proc.pid)) == WORKERS, 60, "api processes", proc, log)
        pids = children(proc.pid)
        wait_until(
            lambda: log.read_text().count("Application startup complete.") == WORKERS,
            120,
            "api startup",
            proc,
            log,
        )

        # Keep-alive connections opened in one burst, as a client's pool does: each process
        # holds some of them (from one shared socket, the first to wake accepts them all).
        conns = [socket.socket() for _ in range(CONNECTIONS)]
        for conn in conns:
            conn.setblocking(False)
            conn.connect_ex(("127.0.0.1", port))
        try:
            time.sleep(0.5)  # loopback handshakes are done by the kernel, at once
            for conn in conns:
                conn.settimeout(10)
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert conn.recv(4096).startswith(b"HTTP/1.1 200")
            held = {pid: established(pid, port) for pid in pids}
        finally:
            for conn in conns:
                conn.close()
        assert sum(held.values()) == CONNECTIONS, held
        assert min(held.values()) >= 2, f"connections per process: {held}"

        # A process killed with -9 is started again; the API answers throughout.
        os.kill(pids[0], signal.SIGKILL)
        wait_until(
            lambda: len(children(proc.pid)) == WORKERS and pids[0] not in children(proc.pid),
            30,
            "the restart",
            proc,
            log,
        )
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        assert "exited with -9; starting it again in 1 s" in log.read_text()

        current = children(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in current)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
