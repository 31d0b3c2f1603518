"""The webhook dispatcher against receivers that misbehave: endless or dripping answers, slow
hosts, dispatchers that die mid-send. Real Valkey (database 2), real loopback HTTP servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socket import socket

import pytest
import redis

from common.apikeys import KeyStore
from common.errors import RateLimited
from common.job import new_job_id
from common.redis import connect
from common.redis_keys import DUE_KEY, delivery_key, events_key, job_key, webhooks_key
from common.settings import Settings
from common.store import delivery_id, iso
from common.webhooks import Deliveries, Dispatcher

Handle = Callable[[BaseHTTPRequestHandler], None]


class Server:
    """A keep-alive HTTP/1.1 server on loopback that counts TCP connections and requests."""

    def __init__(self, handle: Handle) -> None:
        self.connections = 0
        self.hosts: list[str] = []
        self.in_flight: Counter[str] = Counter()
        self.most_at_once: Counter[str] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                host = self.headers.get("host", "")
                with outer.lock:
                    outer.hosts.append(host)
                    outer.in_flight[host] += 1
                    outer.most_at_once[host] = max(outer.most_at_once[host], outer.in_flight[host])
                try:
                    handle(self)
                finally:
                    with outer.lock:
                        outer.in_flight[host] -= 1

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Counting(ThreadingHTTPServer):
            def process_request(self, request: socket, client_address: object) -> None:  # type: ignore[override]
                with outer.lock:
                    outer.connections += 1
                super().process_request(request, client_address)

        self.httpd = Counting(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def answer(status: int = 204, delay: float = 0.0) -> Handle:
    def handle(h: BaseHTTPRequestHandler) -> None:
        time.sleep(delay)
        h.send_response(status)
        h.send_header("content-length", "0")
        h.end_headers()

    return handle


@pytest.fixture
def serve() -> Iterator[Callable[[Handle], Server]]:
    servers: list[Server] = []

    def start(handle: Handle) -> Server:
        servers.append(Server(handle))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    """Database 2: the session's API dispatches on 0, test_dispatcher uses 1."""
    client = connect(redis_url.rsplit("/", 1)[0] + "/2")
    client.flushdb()
    return client


@pytest.fixture
def settings() -> Settings:
    return Settings(
        _env_file=None,
        webhook_allow_loopback=True,
        webhook_timeout_seconds=1.5,
        webhook_dns_timeout_seconds=0.5,
        webhook_retry_base_seconds=0.2,
        webhook_retry_max_seconds=1.0,
        webhook_max_age_seconds=60.0,
        webhook_concurrency=2,
        webhook_per_host_concurrency=1,
        webhook_redeliver_interval_seconds=5.0,
    )


@pytest.fixture
def dispatcher(client: redis.Redis, settings: Settings) -> Iterator[Dispatcher]:
    dispatcher = Dispatcher(client, settings, resolver=lambda host, port: ["127.0.0.1"])
    yield dispatcher
    dispatcher.close()


def add_delivery(client: redis.Redis, url: str, *, age: float = 0.0) -> str:
    """A job.queued delivery in the store's record shape, with the job and event it reports."""
    job_id = new_job_id()
    first_at = time.time() - age
    key_id = KeyStore(client).create(10)[1].id
    client.hset(job_key(job_id), mapping={"id": json.dumps(job_id), "request": '{"prompt":"a"}'})
    event = {"seq": 1, "type": "job.queued", "timestamp": iso(first_at), "data": {"id": job_id}}
    client.rpush(events_key(job_id), json.dumps(event))
    did = delivery_id(job_id, "job.queued")
    client.hset(
        delivery_key(did),
        mapping={
            "id": did,
            "job_id": job_id,
            "key_id": key_id,
            "event": "job.queued",
            "url": url,
            "state": "pending",
            "attempts": 0,
            "first_at": first_at,
            "next_at": first_at,
            "timestamp": iso(first_at),
            "seq": 1,
        },
    )
    client.rpush(webhooks_key(job_id), did)
    client.zadd(DUE_KEY, {did: first_at})
    return did


def job_of(client: redis.Redis, did: str) -> str:
    return str(client.hget(delivery_key(did), "job_id"))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(20)
def test_an_endless_answer_is_cut_after_the_read_limit(
    client: redis.Redis,
    dispatcher: Dispatcher,
    settings: Settings,
    serve: Callable[[Handle], Server],
) -> None:
    cut: list[float] = []

    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("transfer-encoding", "chunked")
        h.end_headers()
        frame = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        until = time.monotonic() + 6
        try:
            while time.monotonic() < until:
                h.wfile.write(frame)
        except OSError:
            cut.append(time.monotonic())
        h.close_connection = True

    server = serve(endless)
    did = add_delivery(client, f"http://hooks.test:{server.port}/x")
    before, started = rss_bytes(), time.monotonic()
    assert dispatcher.deliver(did) == "delivered"
    took = time.monotonic() - started
    assert took < settings.webhook_timeout_seconds
    assert rss_bytes() - before < 50 * 2**20
    deadline = time.monotonic() + 2
    while not cut and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cut, "the dispatcher kept the connection open"
    [delivery] = Deliveries(client, settings).for_job(job_of(client, did))
    assert delivery.attempts == 1 and [a.status_code for a in delivery.history] == [200]


def drip(head: bytes, body: bytes) -> Handle:
    """Write ``head`` at once, then ``body`` one byte every 0.1 s (for at most 6 s)."""

    def handle(h: BaseHTTPRequestHandler) -> None:
        server_stop = time.monotonic() + 6
        try:
            h.wfile.write(head)
            for byte in body:
                if time.monotonic() > server_stop:
                    break
                h.wfile.write(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass
        h.close_connection = True

    return handle


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("handle", "state", "status"),
    [
        # Headers that never end: no status, a retry.
        (drip(b"", b"HTTP/1.1 200 OK\r\nx-pad: " + b"a" * 200), "pending", None),
        # A 200 whose body never ends: delivered, cut at the deadline.
        (drip(b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n", b"b" * 500), "delivered", 200),
    ],
    ids=["headers", "body"],
)
def test_a_dripping_receiver_is_cut_at_the_deadline(
    client: redis.Redis,
    dispatcher: Dispatcher,
    settings: Settings,
    serve: Callable[[Handle], Server],
    handle: Handle,
    state: str,
    status: int | None,
) -> None:
    server = serve(handle)
    did = add_delivery(client, f"http://hooks.test:{server.port}/x")
    started = time.monotonic()
    assert dispatcher.deliver(did) == state
    assert time.monotonic() - started < settings.webhook_timeout_seconds + 0.4
    [delivery] = Deliveries(client, settings).for_job(job_of(client, did))
    assert delivery.attempts == 1 and delivery.history[0].status_code == status
    if status is None:
        assert delivery.history[0].error == "no answer within 1.5 s"


@pytest.mark.timeout(20)
def test_a_hanging_dns_lookup_is_bounded_and_retried(
    client: redis.Redis, settings: Settings, serve: Callable[[Handle], Server]
) -> None:
    release = threading.Event()

    def hang(host: str, port: int) -> list[str]:
        release.wait(10)
        return ["127.0.0.1"]

    server = serve(answer())
    dispatcher = Dispatcher(client, settings, resolver=hang)
    did = add_delivery(client, f"http://hooks.test:{server.port}/x")
    started = time.monotonic()
    try:
        assert dispatcher.deliver(did) == "pending"
    finally:
        release.set()
        dispatcher.close()
    assert time.monotonic() - started < settings.webhook_dns_timeout_seconds + 0.4
    assert server.connections == 0
    error = client.hget(delivery_key(did), "last_error")
    assert error == "resolving 'hooks.test' took longer than 0.5 s"


@pytest.mark.timeout(20)
def test_an_attempt_counted_before_a_crash_is_claimed_again_only_after_the_lease(
    client: redis.Redis,
    dispatcher: Dispatcher,
    settings: Settings,
    serve: Callable[[Handle], Server],
) -> None:
    server = serve(answer())
    dispatcher.lease_margin_seconds = 0.5  # a lease of 2 s
    did = add_delivery(client, f"http://hooks.test:{server.port}/x")
    started = time.monotonic()
    assert dispatcher.claim(10) == [did]
    assert dispatcher.begin(did) == 1
    # The dispatcher "dies" here: the attempt was counted, its outcome is never recorded.
    assert client.hget(delivery_key(did), "attempts") == "1"
    while (claimed := dispatcher.claim(10)) == [] and time.monotonic() - started < 5:
        time.sleep(0.05)
    assert claimed == [did]
    assert time.monotonic() - started >= dispatcher.lease_seconds - 0.1
    assert dispatcher.deliver(did) == "delivered"
    [delivery] = Deliveries(client, settings).for_job(job_of(client, did))
    assert delivery.attempts == 2 and server.connections == 1
    assert delivery.history[0].error == (
        "no outcome recorded: the dispatcher stopped during this attempt"
    )
    assert delivery.history[1].status_code == 204


@pytest.mark.timeout(20)
def test_a_delivery_past_its_age_after_a_crash_fails_without_a_send(
    client: redis.Redis,
    dispatcher: Dispatcher,
    settings: Settings,
    serve: Callable[[Handle], Server],
) -> None:
    server = serve(answer())
    dispatcher.lease_margin_seconds = 0.5
    # Within its retry window now, past it when the lease ends.
    did = add_delivery(client, f"http://hooks.test:{server.port}/x", age=59.0)
    assert dispatcher.claim(10) == [did]
    assert dispatcher.begin(did) == 1
    started = time.monotonic()
    while (claimed := dispatcher.claim(10)) == [] and time.monotonic() - started < 5:
        time.sleep(0.05)
    assert claimed == [did]
    assert dispatcher.deliver(did) == "failed"
    assert server.connections == 0
    [delivery] = Deliveries(client, settings).for_job(job_of(client, did))
    assert delivery.state == "failed" and delivery.attempts == 1
    assert delivery.last_error == "gave up: older than the retry window (60.0 s)"
    assert client.zscore(DUE_KEY, did) is None


@pytest.mark.timeout(20)
def test_a_slow_host_does_not_delay_another_host(
    client: redis.Redis,
    dispatcher: Dispatcher,
    settings: Settings,
    serve: Callable[[Handle], Server],
) -> None:
    slow, fast = serve(answer(delay=1.0)), serve(answer())
    slow_ids = [
        add_delivery(client, f"http://slow.test:{slow.port}/x", age=age) for age in (2.0, 1.0)
    ]
    add_delivery(client, f"http://fast.test:{fast.port}/x")
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        while not fast.hosts and time.monotonic() - started < 3:
            time.sleep(0.01)
        fast_after = time.monotonic() - started
        while len(slow.hosts) < 2 and time.monotonic() - started < 6:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(5)
    # Two slots, two deliveries to the slow host first in line: the second is put back.
    assert fast_after < 0.6
    assert len(slow.hosts) == 2 and slow.most_at_once[f"slow.test:{slow.port}"] == 1
    states = {client.hget(delivery_key(did), "state") for did in slow_ids}
    assert states == {"delivered"} and not thread.is_alive()


@pytest.mark.timeout(20)
def test_redeliver_is_rate_limited_and_keeps_the_retry_window(
    client: redis.Redis,
    dispatcher: Dispatcher,
    settings: Settings,
    serve: Callable[[Handle], Server],
) -> None:
    server = serve(answer(500))
    # Past its retry window: a redelivery sends once, then gives up.
    did = add_delivery(client, f"http://hooks.test:{server.port}/x", age=120.0)
    first_at = client.hget(delivery_key(did), "first_at")
    client.hset(delivery_key(did), mapping={"state": "failed", "next_at": ""})
    client.zrem(DUE_KEY, did)
    deliveries = Deliveries(client, settings)
    job_id = job_of(client, did)
    assert deliveries.redeliver(job_id) == [did]
    with pytest.raises(RateLimited) as refused:
        deliveries.redeliver(job_id)
    assert 0 < refused.value.retry_after <= settings.webhook_redeliver_interval_seconds
    assert client.hget(delivery_key(did), "first_at") == first_at
    assert dispatcher.claim(10) == [did]
    assert dispatcher.deliver(did) == "failed"
    assert server.connections == 1
    [delivery] = deliveries.for_job(job_id)
    assert delivery.attempts == 1 and delivery.history[0].status_code == 500
    assert str(delivery.first_at) == first_at


@pytest.mark.timeout(20)
def test_connections_are_not_shared_by_two_hostnames_on_one_address(
    client: redis.Redis, dispatcher: Dispatcher, serve: Callable[[Handle], Server]
) -> None:
    server = serve(answer())
    for name in ("a.test", "b.test"):
        assert dispatcher.deliver(add_delivery(client, f"http://{name}:{server.port}/x")) == (
            "delivered"
        )
    assert server.hosts == [f"a.test:{server.port}", f"b.test:{server.port}"]
    assert server.connections == 2


@pytest.mark.timeout(10)
def test_attempt_histories_keep_the_last_twenty(
    client: redis.Redis, dispatcher: Dispatcher, serve: Callable[[Handle], Server]
) -> None:
    server = serve(answer(503))
    did = add_delivery(client, f"http://hooks.test:{server.port}/x")
    for _ in range(23):
        client.hset(delivery_key(did), "state", "pending")
        dispatcher.deliver(did)
    assert client.llen(f"sdq:webhook:{did}:attempts") == 20
    assert client.hget(delivery_key(did), "attempts") == "23"


@pytest.mark.timeout(30)
def test_serve_delivers_until_sigterm(
    client: redis.Redis, redis_url: str, serve: Callable[[Handle], Server]
) -> None:
    server = serve(answer())
    did = add_delivery(client, f"http://127.0.0.1:{server.port}/x")
    url = redis_url.rsplit("/", 1)[0] + "/2"
    code = (
        "from common.settings import Settings; from common.webhooks import serve; "
        f"serve(Settings(_env_file=None, redis_url={url!r}, webhook_allow_loopback=True))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 20
        while client.hget(delivery_key(did), "state") == "pending":
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert client.hget(delivery_key(did), "state") == "delivered"
