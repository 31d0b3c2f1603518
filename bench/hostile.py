"""Hostile tenants: attacks on a stack of its own, then one line that says whether any hurt.

Everything runs on loopback: its own Valkey, SeaweedFS S3, one Celery worker serving every
tier with the tiny model, the API (and ``sdq dispatcher`` where it exists) and webhook
receivers. Each attack is bounded in count and time. While it runs, a probe asks
``/healthz`` every 0.25 s and submits a job from another key every second: an *outage* is
a probe that failed. A *charged refusal* is a credit the attacking key lost beyond what
its accepted jobs cost. The last line reads

    16 attacks, 0 failed, 0 outages, 0 charged refusals, API peak +38 MB,
    Redis +2 MB per 1000 jobs, fair-share delay 2 jobs

and the exit status is non-zero if any attack failed its checks, made an outage or charged
a refusal.

    python bench/hostile.py             # make hostile
    python bench/hostile.py --short     # smaller counts and durations (the e2e test)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.localstack import SDQ, LocalStack, say, tree_rss  # noqa: E402
from common.apikeys import ApiKey, KeyStore  # noqa: E402
from common.job import Job, JobRequest, JobStatus, new_job_id, now  # noqa: E402
from common.redis_keys import key_jobs_key  # noqa: E402
from common.store import JobStore  # noqa: E402
from tests.receiver import Receiver  # noqa: E402
from tests.support import wait_until  # noqa: E402

MB = 1024 * 1024
CHEAP = {"tier": "budget", "steps": 1, "width": 64, "height": 64}


class Missing(Exception):
    """A part of the contract that the code under test does not have (yet)."""


@dataclass
class Result:
    name: str
    ok: bool = True
    outage: bool = False
    charged: int = 0
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def check(self, condition: bool, message: str) -> None:
        """Record a failed expectation (the attack goes on)."""
        if not condition:
            self.ok = False
            self.notes.append(message)


# --- raw sockets ------------------------------------------------------------------------


def read_status(sock: socket.socket, timeout: float) -> int | None:
    """The status code of the response on ``sock``, or None when none came in time."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(OSError):
        while b"\r\n" not in data and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    if data.startswith(b"HTTP/") and b" " in data:
        with contextlib.suppress(ValueError, IndexError):
            return int(data.split(b" ", 2)[1])
    return None


def exchange(
    port: int, head: bytes, body: bytes = b"", *, timeout: float = 2.0
) -> tuple[int | None, int, float]:
    """Send ``head`` and as much of ``body`` as the server takes before it answers (64 KiB
    at a time, stopping when a response is waiting or the server stops reading); returns
    the status, the body bytes sent and the seconds from the last byte sent to the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        sent = 0
        sock.settimeout(1.0)
        while sent < len(body):
            if select.select([sock], [], [], 0)[0]:
                break  # answered early
            try:
                sent += sock.send(body[sent : sent + 65536])
            except OSError:
                break
        started = time.monotonic()
        status = read_status(sock, timeout)
        return status, sent, time.monotonic() - started


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class EndlessReceiver:
    """A webhook receiver that answers 200 and then a chunked body that never ends (until
    ``stop``), 64 KiB a chunk, on every connection."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.streaming = threading.Event()
        self.connections = 0
        self.bytes_sent = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(rest) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    rest += chunk
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
                piece = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
                while self.streaming.is_set():
                    conn.sendall(piece)
                    self.bytes_sent += len(piece)
                conn.sendall(b"0\r\n\r\n")

    def close(self) -> None:
        self._closed = True
        self.streaming.clear()
        self.server.close()


# --- the probe --------------------------------------------------------------------------


class Probe:
    """While an attack runs: ``/healthz`` every 0.25 s, and a job from another key every
    second (canceled at once in the store, so the worker stays free). Failures are outages."""

    def __init__(self, hostile: Hostile) -> None:
        self.hostile = hostile
        self.failures: list[str] = []
        self.checks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        h = self.hostile
        raw, _ = h.new_key(100_000, "probe")
        with httpx.Client(base_url=h.api_url, timeout=3) as client:
            last_submit = 0.0
            while not self._stop.is_set():
                self.checks += 1
                try:
                    status = client.get("/healthz").status_code
                    if status != 200:
                        self.failures.append(f"/healthz answered {status}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"/healthz: {type(exc).__name__}")
                if time.monotonic() - last_submit >= 1.0:
                    last_submit = time.monotonic()
                    self.failures += h.bystander_submits(client, raw, 1)
                self._stop.wait(0.25)


# --- the attacks ------------------------------------------------------------------------


class Hostile:
    def __init__(self, stack: LocalStack, args: argparse.Namespace, dispatcher: bool) -> None:
        self.stack = stack
        self.args = args
        self.short: bool = args.short
        self.api_url = stack.api_url
        self.port = stack.api_port
        self.redis = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        self.keys = KeyStore(self.redis)
        self.store = JobStore(self.redis)
        self.http = httpx.Client(base_url=self.api_url, timeout=15)
        self.receiver = Receiver()
        self.endless = EndlessReceiver()
        self.separate_dispatcher = dispatcher
        self.rss_base = self.front_rss()
        self.rss_peak = self.rss_base
        self.redis_mb_per_1000: float | None = None
        self.fair_share_delay: int | None = None

    def close(self) -> None:
        self.http.close()
        self.receiver.close()
        self.endless.close()

    # --- helpers ----------------------------------------------------------------------
    def front_rss(self) -> int:
        """RSS of the processes that face tenants: the API and a separate dispatcher."""
        names = ["api", "dispatcher"] if self.separate_dispatcher else ["api"]
        return sum(tree_rss(self.stack.procs[n].pid) for n in names if n in self.stack.procs)

    def sample_rss(self) -> int:
        rss = self.front_rss()
        self.rss_peak = max(self.rss_peak, rss)
        return rss

    def new_key(
        self, credits: int = 1000, name: str = "hostile", **limits: Any
    ) -> tuple[str, ApiKey]:
        """A key; ``limits`` (rate, max_jobs, max_priority) need the per-key limits."""
        if not limits:
            return self.keys.create(credits, name)
        try:
            return self.keys.create(credits, name, **limits)
        except TypeError as exc:
            raise Missing(f"KeyStore.create takes no per-key limits ({exc})") from None

    def credits(self, key_id: str) -> int:
        return self.keys.credits(key_id)

    def owed(self, key_id: str) -> int:
        """What the key's jobs cost, less what was refunded."""
        ids = [str(i) for i in self.redis.zrange(key_jobs_key(key_id), 0, -1)]
        jobs = self.store.get_many(ids)
        return sum(job.cost for job in jobs if job is not None and not job.refunded)

    def overcharge(self, record: ApiKey) -> int:
        """Credits the key lost beyond what its jobs cost: charged refusals."""
        spent = record.credits - self.credits(record.id)
        return max(0, spent - self.owed(record.id))

    def cancel_all(self, key_id: str) -> None:
        """Cancel the key's jobs that have not ended, in the store (no rate limit there)."""
        ids = [str(i) for i in self.redis.zrange(key_jobs_key(key_id), 0, -1)]
        for job in self.store.get_many(ids):
            if job is not None and not job.status.terminal:
                self.store.cancel(job)

    def bystander_submits(self, client: httpx.Client, raw: str, count: int) -> list[str]:
        """``count`` submits of another key; each that is not 202 is an outage."""
        failures = []
        for _ in range(count):
            try:
                response = client.post(
                    "/v1/jobs",
                    json={"prompt": "bystander", **CHEAP},
                    headers={"Authorization": raw},
                )
            except httpx.HTTPError as exc:
                failures.append(f"another key's submit: {type(exc).__name__}")
                continue
            if response.status_code != 202:
                failures.append(f"another key's submit answered {response.status_code}")
                continue
            with contextlib.suppress(Exception):
                self.store.cancel(self.store.get(response.json()["id"]))
        return failures

    def store_job(self, record: ApiKey, **fields: Any) -> Job:
        """A queued job written to the store only: no broker message, so it never runs."""
        request = JobRequest.model_validate({"prompt": "held", **CHEAP, **fields})
        job = Job(
            id=new_job_id(), key_id=record.id, tier=request.tier, status=JobStatus.QUEUED,
            request=request, seed=1, steps=1, cost=1, created_at=now(),
        )  # fmt: skip
        self.store.create([job])
        return job

    def dataset_bytes(self) -> int:
        """Redis memory less its overhead (client buffers, replication backlog): the data."""
        memory = self.redis.info("memory")
        return int(memory.get("used_memory_dataset", memory["used_memory"]))

    def wait_terminal(self, ids: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s is None or s.terminal for s in self.store.statuses(ids)):
                return True
            time.sleep(0.2)
        return False

    # --- 1 ----------------------------------------------------------------------------
    def endless_webhook(self, r: Result) -> None:
        seconds = 5 if self.short else 25
        raw, _ = self.new_key()
        self.endless.streaming.set()
        body = {"prompt": "endless", **CHEAP, "webhook_url": self.endless.url + "/hook",
                "webhook_events": ["job.queued", "job.succeeded"]}  # fmt: skip
        response = self.http.post("/v1/jobs", json=body, headers={"Authorization": raw})
        r.check(response.status_code == 202, f"submit answered {response.status_code}")
        job_id = response.json().get("id") if response.status_code == 202 else None
        base = self.front_rss()
        peak = base
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            peak = max(peak, self.sample_rss())
            time.sleep(0.2)
        self.endless.streaming.clear()
        growth = (peak - base) / MB
        r.figures |= {"rss_growth_mb": round(growth, 1), "receiver_mb_sent":
                      round(self.endless.bytes_sent / MB, 1), "connections": self.endless.connections}  # fmt: skip
        r.check(growth < 300, f"the API grew by {growth:.0f} MB")
        r.check(self.endless.connections > 0, "no delivery reached the receiver")
        attempts = 0
        if job_id:
            until = time.monotonic() + 8
            while time.monotonic() < until and attempts == 0:
                view = self.http.get(f"/v1/jobs/{job_id}", headers={"Authorization": raw}).json()
                attempts = sum(d.get("attempts", 0) for d in view.get("webhooks", []))
                time.sleep(0.3)
        r.figures["attempts"] = attempts
        r.check(attempts > 0, "the delivery recorded no attempt")

    # --- 2 ----------------------------------------------------------------------------
    def event_streams(self, r: Result) -> None:
        count = 300
        raw, record = self.new_key()
        job = self.store_job(record)
        before = self.pubsub_clients()
        head = request_head("GET", f"/v1/jobs/{job.id}/events",
                            {"Authorization": raw, "Accept": "text/event-stream"})  # fmt: skip
        socks: list[socket.socket] = []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                sock.sendall(head)
                socks.append(sock)
            statuses = Counter(read_status(sock, 5) for sock in socks)
            during = self.pubsub_clients()
            with httpx.Client(base_url=self.api_url, timeout=10) as client:
                other, _ = self.new_key(100, "other")
                failures = self.bystander_submits(client, other, 10)
        finally:
            for sock in socks:
                sock.close()
        self.store.cancel(job)
        r.figures |= {"statuses": {str(k): v for k, v in statuses.items()},
                      "pubsub_connections_added": during - before}  # fmt: skip
        r.check(not failures, f"another key's submits: {failures}")
        r.outage = bool(failures)
        r.check(statuses[429] > count // 2, f"only {statuses[429]} of {count} streams refused 429")
        r.check(not any(s and s >= 500 for s in statuses), f"5xx among {dict(statuses)}")
        r.check(during - before <= 1, f"{during - before} pub/sub connections for the streams")

    def pubsub_clients(self) -> int:
        clients = self.redis.client_list()
        return sum(1 for c in clients if int(c.get("sub", 0)) + int(c.get("psub", 0)) > 0)

    # --- 3 ----------------------------------------------------------------------------
    def hotpot_flood(self, r: Result) -> None:
        count = 50 if self.short else 150
        raw, record = self.new_key(1000)
        form = {"inputText": (None, "a kite"), "steps": (None, "1"),
                "width": (None, "64"), "height": (None, "64")}  # fmt: skip

        async def flood() -> list[tuple[int, bytes]]:
            limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=self.api_url, timeout=90, limits=limits) as c:

                async def one() -> tuple[int, bytes]:
                    try:
                        resp = await c.post("/stable-diffusion-budget", files=form,
                                            headers={"Authorization": raw})  # fmt: skip
                        return resp.status_code, resp.content[:2]
                    except httpx.HTTPError:
                        return 0, b""

                return await asyncio.gather(*(one() for _ in range(count)))

        answers = asyncio.run(flood())
        statuses = Counter(status for status, _ in answers)
        images = sum(1 for status, head in answers if status == 200 and head == b"\xff\xd8")
        taken = record.credits - self.credits(record.id)
        r.figures |= {"statuses": {str(k): v for k, v in statuses.items()}, "images": images,
                      "credits_taken": taken}  # fmt: skip
        r.check(not (statuses[500] or statuses[503] or statuses[0]), f"statuses {dict(statuses)}")
        r.check(images == statuses[200], "a 200 that is not a JPEG")
        r.check(taken == images, f"{taken} credits taken for {images} images")
        r.charged = max(0, taken - images)

    # --- 4 ----------------------------------------------------------------------------
    def huge_body(self, r: Result) -> None:
        raw, record = self.new_key()
        for label, auth in (("no key", {}), ("key", {"Authorization": raw})):
            head = request_head("POST", "/v1/jobs", {**auth, "Content-Type": "application/json",
                                                     "Content-Length": "200000000"})  # fmt: skip
            status, sent, took = exchange(self.port, head, b"0" * 65536, timeout=2)
            r.figures[label] = {"status": status, "sent": sent, "seconds": round(took, 2)}
            # Without a key: 401 (authenticated first) or 413 (the length alone), unread.
            wanted = {401, 403, 413} if not auth else {413}
            r.check(status in wanted, f"{label}: answered {status}, not {sorted(wanted)}")
        r.charged = self.overcharge(record)

    # --- 5 ----------------------------------------------------------------------------
    def bad_metadata(self, r: Result) -> None:
        raw, record = self.new_key()
        json_head = {"Authorization": raw, "Content-Type": "application/json"}
        big = b'{"prompt": "x", "metadata": {"a": "' + b"m" * (20 * MB) + b'"}}'
        lone = b'{"prompt": "x", "metadata": {"a": "\\ud800"}}'
        batch = b'{"jobs": [{"prompt": "fine"}, {"prompt": "x", "metadata": {"a": "\\ud800"}}]}'
        cases = [("20 MB metadata", "/v1/jobs", big), ("lone surrogate", "/v1/jobs", lone),
                 ("lone surrogate in a batch", "/v1/batches", batch)]  # fmt: skip
        for label, path, body in cases:
            head = request_head("POST", path, {**json_head, "Content-Length": str(len(body))})
            status, _, _ = exchange(self.port, head, body, timeout=10)
            r.figures[label] = status
            r.check(status is not None and 400 <= status < 500, f"{label}: answered {status}")
        r.check(self.credits(record.id) == record.credits, "credits changed")
        r.check(self.redis.zcard(key_jobs_key(record.id)) == 0, "a job was created")
        r.charged = record.credits - self.credits(record.id)

    # --- 6 ----------------------------------------------------------------------------
    def fair_share(self, r: Result) -> None:
        count = 30 if self.short else 300
        raw_a, record_a = self.new_key(10_000, "A")
        raw_b, _ = self.new_key(100, "B")
        memory_before = self.dataset_bytes()
        jobs = [{"prompt": f"a {i}", **CHEAP} for i in range(count)]
        response = self.http.post(
            "/v1/batches", json={"jobs": jobs}, headers={"Authorization": raw_a}
        )
        r.check(response.status_code == 202, f"A's batch answered {response.status_code}")
        if response.status_code != 202:
            return
        a_ids = [job["id"] for job in response.json()["jobs"]]
        submitted = time.time()
        response = self.http.post("/v1/jobs", json={"prompt": "b", **CHEAP},
                                  headers={"Authorization": raw_b})  # fmt: skip
        r.check(response.status_code == 202, f"B's job answered {response.status_code}")
        b_id = response.json()["id"]
        deadline = time.monotonic() + (60 if self.short else 180)
        b_job = self.store.get(b_id)
        while b_job.started_at is None and time.monotonic() < deadline:
            time.sleep(0.1)
            b_job = self.store.get(b_id)
        r.check(b_job.started_at is not None, "B's job never started")
        b_start = b_job.started_at or time.time()
        ahead = sum(
            1 for job in self.store.get_many(a_ids)
            if job and job.started_at and submitted <= job.started_at < b_start
        )  # fmt: skip
        self.fair_share_delay = ahead
        r.figures |= {"a_jobs": count, "started_before_b": ahead,
                      "b_wait_s": round(b_start - submitted, 2)}  # fmt: skip
        r.check(ahead <= 4, f"{ahead} of A's jobs started before B's")
        self.cancel_all(record_a.id)
        ended = self.wait_terminal([*a_ids, b_id], 60)
        r.check(ended, "A's jobs did not end after the cancel")
        growth = self.dataset_bytes() - memory_before
        self.redis_mb_per_1000 = growth / MB / (count + 1) * 1000
        r.figures["redis_mb_per_1000_jobs"] = round(self.redis_mb_per_1000, 2)
        r.charged = self.overcharge(record_a)

    # --- 7 ----------------------------------------------------------------------------
    def rate_limit(self, r: Result) -> None:
        raw, record = self.new_key(1000, "rate5", rate=5)
        auth = {"Authorization": raw}
        statuses: Counter[int] = Counter()
        retry_after = []
        for i in range(40):
            response = self.http.post("/v1/jobs", json={"prompt": f"r {i}", **CHEAP}, headers=auth)
            statuses[response.status_code] += 1
            if response.status_code == 429:
                retry_after.append(response.headers.get("retry-after"))
        spent = record.credits - self.credits(record.id)
        r.figures |= {"statuses": {str(k): v for k, v in statuses.items()}, "spent": spent}
        r.check(statuses[429] > 0, "no 429 in a burst of 40 at rate 5")
        r.check(
            all(value and value.isdigit() for value in retry_after), "a 429 without Retry-After"
        )
        r.check(spent == statuses[202], f"{spent} credits for {statuses[202]} accepted jobs")
        r.charged = max(0, spent - statuses[202])
        wait = max([int(v) for v in retry_after if v and v.isdigit()] or [1])
        time.sleep(min(wait, 10))
        again = self.http.post("/v1/jobs", json={"prompt": "again", **CHEAP}, headers=auth)
        r.figures["after_retry_after"] = again.status_code
        r.check(again.status_code == 202, f"after Retry-After: {again.status_code}")
        self.cancel_all(record.id)

    # --- 8 ----------------------------------------------------------------------------
    def max_jobs(self, r: Result) -> None:
        raw, record = self.new_key(1000, "max3", max_jobs=3)
        auth = {"Authorization": raw}
        slow = {"prompt": "slow", "tier": "budget", "steps": 30, "width": 256, "height": 256}
        first = self.http.post("/v1/jobs", json=slow, headers=auth).status_code
        batch = self.http.post("/v1/batches", json={"jobs": [slow] * 3}, headers=auth).status_code
        more = [self.http.post("/v1/jobs", json=slow, headers=auth).status_code for _ in range(2)]
        fourth = self.http.post("/v1/jobs", json=slow, headers=auth)
        jobs = self.redis.zcard(key_jobs_key(record.id))
        spent = record.credits - self.credits(record.id)
        r.figures |= {"first": first, "batch_of_3": batch, "next_two": more,
                      "fourth": fourth.status_code, "jobs": jobs, "spent": spent}  # fmt: skip
        r.check(first == 202 and more == [202, 202], "the first three were not all accepted")
        r.check(batch == 429, f"a batch past the cap answered {batch}")
        r.check(fourth.status_code == 429, f"the fourth job answered {fourth.status_code}")
        r.check("retry-after" in fourth.headers, "the 429 has no Retry-After")
        r.check(jobs == 3, f"{jobs} jobs created")
        r.charged = self.overcharge(record)
        self.cancel_all(record.id)

    # --- 9 ----------------------------------------------------------------------------
    def revoke(self, r: Result) -> None:
        raw, record = self.new_key()
        auth = {"Authorization": raw}
        r.check(
            self.http.get("/v1/account", headers=auth).status_code == 200, "a fresh key refused"
        )
        done = subprocess.run([*SDQ, "keys", "revoke", record.id], env=self.stack.env,
                              capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
        if done.returncode != 0:
            raise Missing(f"sdq keys revoke: {done.stderr.strip().splitlines()[-1:]}")
        revoked = time.monotonic()
        status = 200
        while status == 200 and time.monotonic() - revoked < 3:
            status = self.http.get("/v1/account", headers=auth).status_code
            time.sleep(0.02)
        took = time.monotonic() - revoked
        r.figures |= {"status": status, "seconds": round(took, 2)}
        r.check(status in (401, 403) and took <= 1.0, f"{status} after {took:.2f} s")

    # --- 10 ---------------------------------------------------------------------------
    def priority_cap(self, r: Result) -> None:
        raw, record = self.new_key(100, "prio5", max_priority=5)
        response = self.http.post("/v1/jobs", json={"prompt": "vip", **CHEAP, "priority": 9},
                                  headers={"Authorization": raw})  # fmt: skip
        r.figures["status"] = response.status_code
        if response.status_code == 202:
            view = response.json()
            # The job's own priority is the one it runs at; the request keeps what was asked.
            given = view.get("priority", view["request"]["priority"])
            r.figures |= {"asked": view["request"]["priority"], "priority": given}
            r.check(given <= 5, f"priority {given} accepted from a key capped at 5")
        else:
            r.check(400 <= response.status_code < 500, f"answered {response.status_code}")
        r.charged = self.overcharge(record)
        self.cancel_all(record.id)

    # --- 11 ---------------------------------------------------------------------------
    def slowloris(self, r: Result) -> None:
        socks = []
        try:
            for _ in range(200):
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
                socks.append(sock)
            time.sleep(2 if self.short else 10)
            with httpx.Client(base_url=self.api_url, timeout=5) as client:
                healthy = client.get("/healthz").status_code
                other, _ = self.new_key(100, "other")
                failures = self.bystander_submits(client, other, 5)
        finally:
            for sock in socks:
                sock.close()
        r.figures["healthz"] = healthy
        r.check(healthy == 200 and not failures, f"healthz {healthy}, submits {failures}")
        r.outage = healthy != 200 or bool(failures)

    # --- 12 ---------------------------------------------------------------------------
    def redeliver_spam(self, r: Result) -> None:
        raw, record = self.new_key()
        auth = {"Authorization": raw}
        hook = self.receiver.url + "/redeliver"
        body = {"prompt": "hook", **CHEAP, "webhook_url": hook, "webhook_events": ["job.succeeded"]}
        job_id = self.http.post("/v1/jobs", json=body, headers=auth).json()["id"]
        r.check(self.wait_terminal([job_id], 30), "the job did not end")
        statuses = [
            self.http.post(f"/v1/jobs/{job_id}/webhook/redeliver", headers=auth).status_code
            for _ in range(20)
        ]
        r.figures["statuses"] = dict(Counter(statuses))
        r.check(statuses[0] == 202, f"the first redeliver answered {statuses[0]}")
        r.check(all(s == 429 for s in statuses[1:]), f"later redelivers: {Counter(statuses[1:])}")
        r.charged = self.overcharge(record)

    # --- 13 ---------------------------------------------------------------------------
    def huge_header(self, r: Result) -> None:
        # A 1 MB header: a server that reads headers without a bound holds every byte.
        head = request_head("GET", "/healthz", {"X-Big": "a" * MB})
        status, _, took = exchange(self.port, head, timeout=5)
        r.figures |= {"status": status, "seconds": round(took, 2)}
        r.check(status is None or 400 <= status < 500, f"answered {status}")

    def form_fields(self, r: Result) -> None:
        raw, record = self.new_key()
        encoded = "inputText=kite&" + "&".join(f"f{i}=1" for i in range(10_000))
        boundary = "hostileboundary"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\n1\r\n'
                 for i in range(10_000)]  # fmt: skip
        multipart = "".join(parts) + f"--{boundary}--\r\n"
        cases = [("url-encoded", "application/x-www-form-urlencoded", encoded),
                 ("multipart", f"multipart/form-data; boundary={boundary}", multipart)]  # fmt: skip
        for label, content_type, text in cases:
            response = self.http.post(
                "/stable-diffusion-budget", content=text.encode(),
                headers={"Authorization": raw, "Content-Type": content_type},
            )  # fmt: skip
            r.figures[label] = response.status_code
            r.check(400 <= response.status_code < 500, f"{label}: {response.status_code}")
            if response.status_code >= 400:
                body = response.json()
                r.check(body.get("code") == response.status_code, f"{label}: body {body}")
        r.charged = record.credits - self.credits(record.id)

    def big_cursor(self, r: Result) -> None:
        raw, _ = self.new_key()
        response = self.http.get(
            "/v1/jobs", params={"cursor": 10**18}, headers={"Authorization": raw}
        )
        r.figures["status"] = response.status_code
        r.check(400 <= response.status_code < 500, f"answered {response.status_code}")

    def unknown_paths(self, r: Result) -> None:
        raw, _ = self.new_key()
        count = 300 if self.short else 2000
        statuses: Counter[int] = Counter()
        started = time.monotonic()
        for _ in range(count):
            path = f"/{uuid.uuid4().hex}/{uuid.uuid4().hex[:8]}"
            statuses[self.http.get(path, headers={"Authorization": raw}).status_code] += 1
        r.figures |= {"statuses": {str(k): v for k, v in statuses.items()},
                      "per_second": round(count / (time.monotonic() - started))}  # fmt: skip
        r.check(set(statuses) <= {404, 429}, f"statuses {dict(statuses)}")

    def attacks(self) -> list[tuple[str, Callable[[Result], None]]]:
        return [
            ("endless webhook response", self.endless_webhook),
            ("300 event streams", self.event_streams),
            ("concurrent Hotpot requests", self.hotpot_flood),
            ("200 MB body", self.huge_body),
            ("bad metadata", self.bad_metadata),
            ("fair share", self.fair_share),
            ("rate limit", self.rate_limit),
            ("max_jobs", self.max_jobs),
            ("revoke", self.revoke),
            ("priority cap", self.priority_cap),
            ("200 idle connections", self.slowloris),
            ("redeliver spam", self.redeliver_spam),
            ("huge header", self.huge_header),
            ("10,000 form fields", self.form_fields),
            ("cursor 10^18", self.big_cursor),
            ("unknown path flood", self.unknown_paths),
        ]

    def run(self, attack: Callable[[Result], None], name: str) -> Result:
        result = Result(name)
        started = time.monotonic()
        with Probe(self) as probe:
            try:
                attack(result)
            except Missing as exc:
                result.check(False, f"missing: {exc}")
            except Exception as exc:
                result.check(False, f"error: {type(exc).__name__}: {exc}")
            self.sample_rss()
        result.seconds = round(time.monotonic() - started, 1)
        if probe.failures:
            result.outage = True
            result.notes.append(f"probe: {Counter(probe.failures).most_common(3)}")
        return result


@contextlib.contextmanager
def sampling(hostile: Hostile) -> Iterator[None]:
    """Samples the API's RSS every 0.5 s in the background, for its peak."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(0.5):
            hostile.sample_rss()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def has_dispatcher_command(stack: LocalStack) -> bool:
    done = subprocess.run([*SDQ, "dispatcher", "--help"], env=stack.env, cwd=ROOT,
                          capture_output=True, timeout=60)  # fmt: skip
    return done.returncode == 0


def start(stack: LocalStack, args: argparse.Namespace) -> bool:
    """The stack, in parallel where it can be; returns whether a separate dispatcher runs."""
    reuse = Path(args.model) if args.model else None
    default = ROOT / ".sdq" / "models" / "tiny-sdxl"
    if reuse is None and (default / "model_index.json").exists():
        reuse = default
    build = stack.build_model(reuse)
    stack.start_valkey()
    stack.start_s3()
    dispatcher = has_dispatcher_command(stack)
    stack.env["SDQ_WEBHOOK_DISPATCHER"] = "0" if dispatcher else "1"
    stack.start_api()
    if dispatcher:
        stack.spawn("dispatcher", [*SDQ, "dispatcher"])
    if build is not None:
        if build.wait(180) != 0:
            raise RuntimeError(f"building the tiny model failed:\n{stack.log_tail('build-tiny')}")
        stack.procs.pop("build-tiny")
    log = stack.home / "worker.log"
    argv = [*SDQ, "worker", "--tier", "budget", "--tier", "normal", "--tier", "premium"]
    worker = stack.spawn("worker", [*argv, "--name", "hostile@local"])
    wait_until(lambda: "ready." in log.read_text(errors="replace"), 120, "worker", worker, log)
    return dispatcher


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", action="store_true", help="Smaller counts and durations.")
    parser.add_argument("--json", help="Write the figures to this file.")
    parser.add_argument("--model", help="A tiny model directory to reuse (else one is built).")
    parser.add_argument("--only", action="append", help="Run only attacks whose name has this.")
    parser.add_argument("--keep", help="Keep the servers' data and logs in this directory.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sdq-hostile-") as tmp:
        home = Path(args.keep) if args.keep else Path(tmp)
        home.mkdir(parents=True, exist_ok=True)
        stack = LocalStack(home, "hostile", {
            "SDQ_SYNC_TIMEOUT_SECONDS": "60",
            "SDQ_WEBHOOK_TIMEOUT_SECONDS": "3",
            "SDQ_WEBHOOK_RETRY_BASE_SECONDS": "0.5",
            "SDQ_WEBHOOK_RETRY_MAX_SECONDS": "2",
        })  # fmt: skip
        hostile = None
        try:
            dispatcher = start(stack, args)
            say(f"stack up{' (dispatcher apart)' if dispatcher else ''}")
            hostile = Hostile(stack, args, dispatcher)
            return report(hostile, args)
        finally:
            if hostile is not None:
                hostile.close()
            stack.stop(wait=5)  # throwaway data: no need for SeaweedFS's 15 s drain


def report(hostile: Hostile, args: argparse.Namespace) -> int:
    results = []
    started = time.monotonic()
    with sampling(hostile):
        for name, attack in hostile.attacks():
            if args.only and not any(part in name for part in args.only):
                continue
            result = hostile.run(attack, name)
            results.append(result)
            verdict = "ok" if result.ok and not result.outage and not result.charged else "FAILED"
            say(f"{name}: {verdict} in {result.seconds}s {json.dumps(result.figures)}"
                + "".join(f"\n    {note}" for note in result.notes))  # fmt: skip
    failed = sum(1 for r in results if not r.ok)
    outages = sum(1 for r in results if r.outage)
    charged = sum(r.charged for r in results)
    peak = (hostile.rss_peak - hostile.rss_base) / MB
    redis_mb = hostile.redis_mb_per_1000
    delay = hostile.fair_share_delay
    summary = [
        f"{len(results)} attacks",
        f"{failed} failed",
        f"{outages} outages",
        f"{charged} charged refusals",
        f"API peak +{peak:.0f} MB",
        "Redis "
        + (f"+{redis_mb:.1f} MB per 1000 jobs" if redis_mb is not None else "not measured"),
        "fair-share delay " + (f"{delay} jobs" if delay is not None else "not measured"),
    ]
    if args.json:
        figures = {
            "summary": ", ".join(summary),
            "seconds": round(time.monotonic() - started, 1),
            "api_peak_mb": round(peak, 1),
            "redis_mb_per_1000_jobs": redis_mb,
            "fair_share_delay": delay,
            "attacks": [asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(figures, indent=2))
    print(", ".join(summary), flush=True)
    return 0 if failed == outages == charged == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
