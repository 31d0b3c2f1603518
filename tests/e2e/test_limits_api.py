"""The API process bounded against hostile tenants: bodies refused unread or cut while they
arrive, keys checked before any body byte, bounded headers, streams and waits capped per key
and per process on one Redis subscriber."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from common.apikeys import KeyStore
from common.job import Job, JobRequest, JobStatus, new_job_id, now
from common.redis import connect
from common.store import JobStore
from producer.servers import free_port
from tests.factories import PARKED
from tests.support import spawn, stop, wait_until

Key = Callable[..., str]
BIG = 200 * 1024 * 1024


# Raw HTTP, so a test controls exactly what is sent and when.


def open_socket(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    return sock


def send_head(
    url: str, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> socket.socket:
    sock = open_socket(url)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {urlsplit(url).netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the response (read until the server closes, or until
    Content-Length bytes of body arrived)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", -1))
    with contextlib.suppress(OSError):
        while length < 0 or len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(status_line.split()[1]), headers, body


def error(body: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(body)
    assert set(parsed) == {"code", "message"}, parsed
    return parsed


def make_key(keys: KeyStore, credits: int = 10) -> tuple[str, str]:
    """A new key: the raw key and its id."""
    raw, record = keys.create(credits, name="limits")
    return raw, record.id


def credits(url: str, key: str) -> int:
    response = httpx.get(f"{url}/v1/account", headers={"Authorization": key}, timeout=10)
    assert response.status_code == 200, response.text
    value: int = response.json()["credits"]
    return value


def own_jobs(url: str, key: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/v1/jobs", headers={"Authorization": key}, timeout=10)
    assert response.status_code == 200, response.text
    jobs: list[dict[str, Any]] = response.json()["jobs"]
    return jobs


def stored_job(store: JobStore, key_id: str) -> Job:
    """A queued job of ``key_id`` written straight to the store (charged one credit): no
    worker ever runs it, so its streams stay open until it is canceled."""
    request = JobRequest(prompt="a lighthouse")
    job = Job(
        id=new_job_id(),
        key_id=key_id,
        tier=request.tier,
        status=JobStatus.QUEUED,
        request=request,
        seed=1,
        steps=2,
        cost=1,
        created_at=now(),
        lane=PARKED,  # no reconciler sends it a message
    )
    store.create([job])
    return job


def open_stream(url: str, key: str, job_id: str) -> tuple[socket.socket, int, dict[str, Any]]:
    """An events request: its socket, still open, when it answered 200; otherwise its status
    and error body, with the response's headers under ``headers``."""
    sock = send_head(url, "GET", f"/v1/jobs/{job_id}/events", {"Authorization": key})
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    status = int(data.split(b" ", 2)[1])
    head, _, body = data.partition(b"\r\n\r\n")
    if status == 200:
        return sock, status, {"received": body}  # the stream's first bytes may be in already
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, body
        body += chunk
    sock.close()
    return sock, status, {**error(body), "headers": headers}


def wait_for(check: Callable[[], bool], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def open_when_free(
    url: str, key: str, job_id: str, timeout: float = 5
) -> tuple[socket.socket, bytes]:
    """A stream and its first bytes, once a slot is free (a previous test's are released
    within a second)."""
    deadline = time.monotonic() + timeout
    while True:
        sock, status, opened = open_stream(url, key, job_id)
        if status == 200:
            return sock, opened["received"]
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def stream_opens(url: str, key: str, job_id: str) -> bool:
    sock, status, _ = open_stream(url, key, job_id)
    sock.close()
    return status == 200


@contextlib.contextmanager
def closing_all(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def submit(url: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/jobs",
        json={"prompt": "a fox", "tier": "budget", "steps": 1},
        headers={"Authorization": key},
        timeout=15,
    )


# Bodies.


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/jobs", "application/json"),
        ("/v1/batches", "application/json"),
        ("/stable-diffusion-normal", "multipart/form-data; boundary=x"),
    ],
)
def test_a_huge_body_is_refused_before_it_is_sent(
    api_url: str, new_key: Key, path: str, content_type: str
) -> None:
    key = new_key(10)
    for auth, status, fragment in [
        ({}, 401, "missing API key"),
        ({"Authorization": "sdq_not-a-key"}, 403, "invalid API key"),
        ({"Authorization": key}, 413, "request body too large"),
    ]:
        started = time.monotonic()
        headers = {**auth, "Content-Type": content_type, "Content-Length": str(BIG)}
        sock = send_head(api_url, "POST", path, headers, b"{" + b" " * 4096)
        try:
            got, response_headers, body = read_response(sock)
        finally:
            sock.close()
        assert got == status, body
        assert fragment in error(body)["message"]
        assert response_headers.get("connection") == "close"
        assert time.monotonic() - started < 5  # 4 KiB of 200 MB were sent
    assert credits(api_url, key) == 10


def test_a_streamed_upload_is_cut_while_it_arrives(api_url: str, new_key: Key) -> None:
    key = new_key(10)
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        chunk = b" " * 65536
        while sent < BIG:
            sent += len(chunk)
            yield chunk

    started = time.monotonic()
    try:
        response = httpx.post(
            f"{api_url}/v1/jobs",
            content=body(),
            headers={"Authorization": key, "Content-Type": "application/json"},
            timeout=10,
        )
    except httpx.TransportError:
        pass  # a reset while still sending: refused all the same
    else:
        assert response.status_code == 413, response.text
        assert "at most 65536 bytes" in error(response.content)["message"]
    assert sent < BIG
    assert time.monotonic() - started < 10
    assert credits(api_url, key) == 10


def test_a_chunked_body_over_the_limit_is_413(api_url: str, new_key: Key) -> None:
    key = new_key(10)
    headers = {
        "Authorization": key,
        "Content-Type": "application/json",
        "Transfer-Encoding": "chunked",
    }
    chunk = b" " * 8192
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(9)) + b"0\r\n\r\n"
    sock = send_head(api_url, "POST", "/v1/jobs", headers, body)
    try:
        status, response_headers, raw = read_response(sock)
    finally:
        sock.close()
    assert status == 413
    assert error(raw) == {
        "code": 413,
        "message": "request body too large: at most 65536 bytes here",
    }
    assert response_headers["connection"] == "close"
    # Under the limit, the same chunked body is read and parsed.
    small = json.dumps({"prompt": "a chunked fox", "tier": "budget", "steps": 1}).encode()
    sock = send_head(
        api_url, "POST", "/v1/jobs", headers, b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)
    )
    try:
        assert read_response(sock)[0] == 202
    finally:
        sock.close()


def test_unknown_paths_stay_404_and_health_needs_no_key(api_url: str) -> None:
    response = httpx.post(f"{api_url}/v2/nothing", content=b"x" * 1000, timeout=10)
    assert response.status_code == 404
    assert response.json() == {"code": 404, "message": "no such endpoint: POST /v2/nothing"}
    for path in ("/healthz", "/openapi.json", "/metrics"):
        assert httpx.get(f"{api_url}{path}", timeout=10).status_code == 200, path


def test_hotpot_forms_are_bounded_and_charge_nothing(api_url: str, new_key: Key) -> None:
    key = new_key(10)
    url = f"{api_url}/stable-diffusion-normal"
    headers = {"Authorization": key}
    many = {"inputText": (None, "a fox"), **{f"opt{i}": (None, "1") for i in range(40)}}
    response = httpx.post(url, headers=headers, files=many, timeout=10)
    assert response.status_code == 400
    assert "Maximum number of fields is 32" in error(response.content)["message"]
    # The seed's example sends every field as a file part: files are counted the same.
    as_files = {f"opt{i}": (f"opt{i}", b"1") for i in range(40)}
    response = httpx.post(url, headers=headers, files=as_files, timeout=10)
    assert response.status_code == 400
    assert "Maximum number of files is 32" in error(response.content)["message"]
    long_file = {"inputText": ("inputText", b"x" * 10_000)}
    response = httpx.post(url, headers=headers, files=long_file, timeout=10)
    assert response.status_code == 400
    assert error(response.content)["message"] == "inputText: must be at most 8192 bytes"
    huge = {"inputText": ("inputText", b"x" * 70_000)}
    response = httpx.post(url, headers=headers, files=huge, timeout=10)
    assert response.status_code == 413
    assert credits(api_url, key) == 10
    assert own_jobs(api_url, key) == []


# Streams.


@pytest.mark.parametrize("value", ["abc", "-1", "1e3", "1000000001", "99999999999999999999999"])
def test_a_bad_last_event_id_is_400(
    api_url: str, store: JobStore, keys: KeyStore, value: str
) -> None:
    key, key_id = make_key(keys)
    job = stored_job(store, key_id)
    try:
        response = httpx.get(
            f"{api_url}/v1/jobs/{job.id}/events",
            headers={"Authorization": key, "Last-Event-ID": value},
            timeout=10,
        )
        assert response.status_code == 400, response.text
        assert "last-event-id" in error(response.content)["message"]
    finally:
        store.cancel(job)


def test_streams_per_key_are_capped_while_others_submit(
    api_url: str, new_key: Key, store: JobStore, keys: KeyStore
) -> None:
    cap = 20  # SDQ_STREAMS_PER_KEY's default
    key, key_id = make_key(keys)
    job = stored_job(store, key_id)
    with closing_all([]) as socks:
        for _ in range(cap):
            sock, status, _ = open_stream(api_url, key, job.id)
            assert status == 200
            socks.append(sock)
        _, status, refused = open_stream(api_url, key, job.id)
        assert status == 429
        assert refused["message"] == f"too many open event streams for this key ({cap})"
        assert int(refused["headers"]["retry-after"]) >= 1
        assert submit(api_url, new_key(10)).status_code == 202
        socks.pop().close()
        # The closed stream's slot comes back as soon as the server sees the disconnect.
        wait_for(lambda: stream_opens(api_url, key, job.id), "the slot was never released")
    store.cancel(job)
    assert credits(api_url, key) == 10  # the stored job's credit, refunded; streams cost nothing


def test_more_streams_than_a_connection_pool_holds(
    api_url: str, new_key: Key, store: JobStore, keys: KeyStore
) -> None:
    streams: list[socket.socket] = []
    jobs = []
    with closing_all(streams):
        for _ in range(8):
            key, key_id = make_key(keys)
            job = stored_job(store, key_id)
            jobs.append(job)
            for _ in range(19):
                sock, status, _ = open_stream(api_url, key, job.id)
                assert status == 200
                streams.append(sock)
        assert len(streams) == 152
        other = new_key(10)
        started = time.monotonic()
        for _ in range(5):
            assert submit(api_url, other).status_code == 202
        assert time.monotonic() - started < 5
        # Every stream still ends with its job's terminal event.
        store.cancel(jobs[0])
        for sock in streams[:19]:
            sock.settimeout(10)
            data = b""
            while b"job.canceled" not in data:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
    for job in jobs[1:]:
        store.cancel(job)


# A second API process with tiny bounds, on a database no worker serves (jobs stay queued).


@pytest.fixture(scope="module")
def small(env: dict[str, str], workdir: Path, redis_url: str) -> Iterator[tuple[str, KeyStore]]:
    port = free_port()
    log = workdir / "api-small.log"
    db = redis_url.rsplit("/", 1)[0] + "/5"
    overrides = {
        "SDQ_REDIS_URL": db,
        "SDQ_BROKER_URL": db,
        "SDQ_BODY_TIMEOUT_SECONDS": "1",
        "SDQ_API_HEADER_TIMEOUT_SECONDS": "1",
        "SDQ_STREAMS_PER_KEY": "2",
        "SDQ_STREAMS_PER_PROCESS": "4",
        "SDQ_STREAM_MAX_SECONDS": "2",
        "SDQ_WEBHOOK_DISPATCHER": "0",
    }
    argv = [sys.executable, "-m", "producer.cli", "api", "--port", str(port)]
    proc = spawn(argv, log, {**env, **overrides})
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "api", proc, log)
    client = connect(db)
    yield url, KeyStore(client)
    stop(proc)
    client.flushdb()


def test_a_slow_body_is_408(small: tuple[str, KeyStore]) -> None:
    url, keys = small
    key, _ = make_key(keys)
    headers = {"Authorization": key, "Content-Type": "application/json", "Content-Length": "100"}
    started = time.monotonic()
    sock = send_head(url, "POST", "/v1/jobs", headers, b'{"prompt": ')
    try:
        status, response_headers, body = read_response(sock)
    finally:
        sock.close()
    assert status == 408
    assert error(body)["message"] == "the request body did not arrive within 1s"
    assert response_headers["connection"] == "close"
    assert 0.9 < time.monotonic() - started < 5
    assert credits(url, key) == 10


def test_slow_or_huge_request_heads_are_cut(small: tuple[str, KeyStore]) -> None:
    url, _ = small
    # A request line and half a header, then nothing: closed after the head's deadline.
    sock = open_socket(url)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        sock.settimeout(5)
        assert sock.recv(1024) == b""  # closed, unanswered
        assert 0.9 < time.monotonic() - started < 4
    finally:
        sock.close()
    # A kept-alive connection gets the same deadline for its next request's head.
    sock = open_socket(url)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.settimeout(5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        assert sock.recv(1024) == b""
        assert time.monotonic() - started < 4
    finally:
        sock.close()
    # A head larger than the bound is refused, not buffered.
    sock = open_socket(url)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        status, _, _ = read_response(sock)
        assert status in (400, 431)
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed while we were still sending: refused all the same
    finally:
        sock.close()
    assert httpx.get(f"{url}/healthz").status_code == 200


def hotpot_wait(url: str, key: str) -> socket.socket:
    """A synchronous Hotpot request, left waiting (its job is never run)."""
    boundary = "sdqtest"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="inputText"; '
        f'filename="inputText"\r\n\r\na patient fox\r\n--{boundary}--\r\n'
    ).encode()
    headers = {
        "Authorization": key,
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(body)),
    }
    return send_head(url, "POST", "/stable-diffusion-budget", headers, body)


def test_waits_take_a_slot_before_the_charge_and_release_it_on_disconnect(
    small: tuple[str, KeyStore],
) -> None:
    url, keys = small
    key, _ = make_key(keys)
    with closing_all([hotpot_wait(url, key), hotpot_wait(url, key)]) as waits:
        wait_for(lambda: len(own_jobs(url, key)) == 2, "two waits queued their jobs")
        assert credits(url, key) == 10 - 2  # the budget tier: one credit an image
        sock = hotpot_wait(url, key)
        status, headers, body = read_response(sock)
        sock.close()
        assert status == 429
        assert error(body)["message"] == "too many open event streams for this key (2)"
        assert int(headers["retry-after"]) >= 1
        assert credits(url, key) == 10 - 2  # refused before it was charged
        waits.pop().close()
        job_id = own_jobs(url, key)[0]["id"]
        wait_for(lambda: stream_opens(url, key, job_id), "the wait kept its slot")
    jobs = own_jobs(url, key)
    assert len(jobs) == 2 and {job["status"] for job in jobs} == {"queued"}  # the jobs go on


def test_streams_per_process_are_capped_and_end_after_their_lifetime(
    small: tuple[str, KeyStore],
) -> None:
    url, keys = small
    made = [make_key(keys) for _ in range(3)]
    rclient = keys.redis
    assert isinstance(rclient, redis.Redis)
    store = JobStore(rclient, finished_ttl=3600)
    jobs = [stored_job(store, key_id) for _, key_id in made]
    (first, _), (second, _), (third, _) = made
    with closing_all([]) as socks:
        for key, job in [(first, jobs[0])] * 2 + [(second, jobs[1])] * 2:
            sock, received = open_when_free(url, key, job.id)
            socks.append(sock)
            if len(socks) == 1:
                data = received
        _, status, refused = open_stream(url, third, jobs[2].id)
        assert status == 503
        assert "no room for another event stream" in refused["message"]
        assert int(refused["headers"]["retry-after"]) >= 1
        assert credits(url, third) == 9  # its stored job's credit only
        # SDQ_STREAM_MAX_SECONDS=2: a stream ends on its own, with the events so far.
        started = time.monotonic()
        sock = socks[0]
        sock.settimeout(10)
        while not data.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert b"job.queued" in data and b"job.canceled" not in data
        assert time.monotonic() - started < 5
    # The client resumes after the last event it saw, once the server has seen the others go.
    deadline = time.monotonic() + 5
    while True:
        with httpx.stream(
            "GET",
            f"{url}/v1/jobs/{jobs[0].id}/events",
            headers={"Authorization": first, "Last-Event-ID": "1"},
            timeout=10,
        ) as response:
            if response.status_code == 200:
                store.cancel(jobs[0])
                text = "".join(response.iter_text())
                break
        assert time.monotonic() < deadline, response.status_code
        time.sleep(0.1)
    assert "job.canceled" in text and "job.queued" not in text
    for job in jobs[1:]:
        store.cancel(job)
