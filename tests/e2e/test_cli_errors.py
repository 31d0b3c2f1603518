"""Every client command, when the API cannot serve it: one line on stderr, status 1, no
traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from producer.client import ApiTimeoutError, Client

SDQ = [sys.executable, "-m", "producer.cli"]
#: Each client command with the arguments it needs, whatever the API would say of them.
COMMANDS = {
    "submit": ["submit", "a fox", "--tier", "budget"],
    "status": ["status", "job_0123"],
    "cancel": ["cancel", "job_0123"],
    "jobs": ["jobs"],
    "batch": ["batch", "{prompts}", "--out", "{out}"],
}


def run(
    command: str, url: str, key: str, tmp_path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a fox", "tier": "budget"}\n')
    argv = [a.format(prompts=prompts, out=tmp_path / "out") for a in COMMANDS[command]]
    base = env or {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    return subprocess.run(
        [*SDQ, *argv],
        env={**base, "SDQ_API_URL": url, "SDQ_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed on leaving: nothing listens there


@pytest.fixture(scope="module")
def bad_gateway() -> Iterator[str]:
    """What a proxy in front of a dead API answers: 502 and an HTML page."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            body = b"<html>\n<head><title>502 Bad Gateway</title></head>\n<body>nginx</body>\n"
            self.send_response(502)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("command", COMMANDS)
def test_unreachable_api(command: str, closed_port: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    line = one_error_line(run(command, url, "sdq_any", tmp_path))
    assert f"cannot reach the sdq API at {url}: connection refused" in line
    assert "SDQ_API_URL" in line


def test_unknown_host(tmp_path: Path) -> None:
    line = one_error_line(run("jobs", "http://no-such-host.invalid:8000", "sdq_any", tmp_path))
    assert "cannot reach the sdq API at http://no-such-host.invalid:8000" in line


@pytest.mark.parametrize("command", COMMANDS)
def test_url_without_scheme(command: str, tmp_path: Path) -> None:
    line = one_error_line(run(command, "127.0.0.1:8000", "sdq_any", tmp_path))
    assert "invalid API URL '127.0.0.1:8000': use http://host:port" in line


@pytest.mark.parametrize("command", COMMANDS)
def test_server_error(command: str, bad_gateway: str, tmp_path: Path) -> None:
    line = one_error_line(run(command, bad_gateway, "sdq_any", tmp_path))
    assert "502: Bad Gateway" in line and "<html>" not in line


@pytest.mark.parametrize("command", COMMANDS)
def test_refused_key(command: str, env: dict[str, str], api_url: str, keys, tmp_path: Path) -> None:
    line = one_error_line(run(command, api_url, "sdq_wrong", tmp_path, env))
    assert "403: invalid API key" in line and "SDQ_API_KEY" in line


def test_revoked_key_shows_the_servers_message(
    env: dict[str, str], api_url: str, new_key, keys, tmp_path: Path
) -> None:
    key = new_key(5)
    keys.revoke(key)
    line = one_error_line(run("jobs", api_url, key, tmp_path, env))
    assert "403: this API key was revoked" in line


def test_a_model_not_entitled_is_not_blamed_on_the_key(
    env: dict[str, str], api_url: str, new_key, tmp_path: Path
) -> None:
    key = new_key(5)
    proc = subprocess.run(
        [*SDQ, "submit", "a fox", "--tier", "normal", "--model", "sd15"],
        env={**env, "SDQ_API_URL": api_url, "SDQ_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = one_error_line(proc)
    assert "403: model sd15 is available upon request" in line and "SDQ_API_KEY" not in line


def test_a_silent_server_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts connections, never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with (
            Client(url, "sdq_any", timeout=0.5) as client,
            pytest.raises(ApiTimeoutError, match=r"did not answer within 0\.5 s"),
        ):
            client.account()
