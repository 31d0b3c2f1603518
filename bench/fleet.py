"""How cost grows with the fleet: simulated GPU workers on one machine, real everything else.

Each worker is the real Celery worker as `sdq worker` runs it (prefork, one pool child),
with the real job store, encoding, upload to a real SeaweedFS and progress, but a runner
that sleeps ``--seconds-per-image`` per image (``bench/fleet_worker.py``). The API (with
its webhook dispatcher and reconciler, as `sdq api` runs them), Valkey and SeaweedFS are
``bench/localstack.py``'s, on free loopback ports; webhooks go to a receiver on loopback.

For each fleet size of ``--sizes`` (ascending; the workers of one size stay for the next),
jobs from ``--keys`` keys are submitted at a steady rate (``--overload`` times the ideal
throughput, so the queue never runs dry) from ``--clients`` httpx threads; ``--jobs`` is the
count at the largest size, the smaller ones get their share (the same duration each).
Printed one figure a line and written as JSON (``--json``):

* sustained jobs/s (finish times between the 10th and 90th percentile) against the ideal,
  workers / seconds per image, and the ratio;
* Valkey CPU seconds per 1000 jobs (INFO cpu, over the phase, and net of the fleet's idle
  chatter measured just before it) and Valkey's idle CPU with the fleet up;
* Valkey bytes per job (INFO memory before and after) and per finished job's own keys
  (MEMORY USAGE of its hash, event log, webhook list and deliveries);
* submit latency p50/p99; ``GET /v1/jobs`` p50/p99 for a key with ``--history`` finished
  jobs (seeded once: one job run end to end, its records cloned with pipelined writes);
* webhook deliveries per second and their lag (receipt minus the event's timestamp);
* each process group's CPU (API, Valkey, SeaweedFS, workers, this bench) as a share of one
  core, the workers' memory, and per component the fleet size at which it would reach its
  ceiling at the measured cost per worker: what breaks first.

    python bench/fleet.py                                  # 32 workers, 10,000 jobs
    python bench/fleet.py --sizes 8,16,32                  # make fleet
    python bench/fleet.py --workers 8 --jobs 400 --history 10000   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fleet_worker import READY  # noqa: E402
from bench.localstack import LocalStack, children, say  # noqa: E402
from common.apikeys import KeyStore  # noqa: E402
from common.job import JobStatus  # noqa: E402
from common.redis_keys import (  # noqa: E402
    attempts_key,
    delivery_key,
    events_key,
    job_key,
    key_jobs_key,
    webhooks_key,
)
from common.store import JobStore  # noqa: E402
from tests.receiver import Receiver  # noqa: E402
from tests.support import wait_until  # noqa: E402

TIER = "budget"
QUEUED_INDEX = f"sdq:queued:{TIER}"
TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_FLAGS = re.compile(r"torch=(\w+) diffusers=(\w+)")


# --- measuring ---------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending += children(current)
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of the processes ``pids`` (their own, not reaped children's)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size: shared pages (a forked pool child's) counted once."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLOCK_TICKS, sum(values) / CLOCK_TICKS


def valkey_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def valkey_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


# --- the stack ---------------------------------------------------------------------------


class Fleet(LocalStack):
    """``LocalStack`` with workers whose runner sleeps (``bench/fleet_worker.py``)."""

    def __init__(self, args: argparse.Namespace, home: Path) -> None:
        super().__init__(
            home,
            "fleet",
            {
                # The bench's steady submits are not what the per-key rate is for.
                "SDQ_DEFAULT_RATE_PER_SECOND": "100000",
                "SDQ_DEFAULT_MAX_JOBS": str(max(1000, args.jobs + 10)),
                # Loopback receivers: the bench's own.
                "SDQ_WEBHOOK_ALLOW_LOOPBACK": "1",
                # No thread pools sized for the cores in each of dozens of workers.
                "OMP_NUM_THREADS": "1",
            },
        )
        self.args = args
        self.worker_names: list[str] = []

    def start_worker(self, index: int) -> None:
        name = f"worker{index}"
        argv = [
            sys.executable, str(ROOT / "bench" / "fleet_worker.py"),
            "--seconds-per-image", str(self.args.seconds_per_image),
            "worker", "--tier", TIER, "--name", f"fleet{index}@fleet",
        ]  # fmt: skip
        self.spawn(name, argv)
        self.worker_names.append(name)

    def grow(self, size: int) -> float:
        """Start workers until there are ``size``; returns the seconds until all were ready."""
        began = time.monotonic()
        for index in range(len(self.worker_names), size):
            self.start_worker(index)
        wait_until(
            lambda: all(self.worker_ready(name) for name in self.worker_names),
            60 + 3 * size,
            f"{size} workers",
        )
        return time.monotonic() - began

    def stop(self, wait: float = 25) -> None:
        """Workers first, all at once, then the API, while Valkey still answers (a process
        whose store is gone retries for a while before it exits); SeaweedFS holds nothing
        the bench keeps, so it gets a few seconds only."""
        for name in self.worker_names:
            if name in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.procs[name].pid, signal.SIGTERM)
        for name in [*self.worker_names, "api", "weed", "valkey"]:
            if name in self.procs:
                self.kill(name, wait=3 if name == "weed" else wait)
        super().stop(wait)

    def worker_log(self, name: str) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def worker_ready(self, name: str) -> bool:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
        text = self.worker_log(name)
        return " ready." in text and READY in text

    def heavy_imports(self) -> list[str]:
        """Workers whose pool child imported torch or diffusers (each log says)."""
        heavy = []
        for name in self.worker_names:
            flags = _FLAGS.findall(self.worker_log(name))
            if not flags or any("True" in pair for pair in flags):
                heavy.append(name)
        return heavy

    def worker_pids(self) -> list[int]:
        return [pid for name in self.worker_names for pid in tree(self.procs[name].pid)]

    def groups(self) -> dict[str, list[int]]:
        """Process groups by component; each a list of live pids."""
        return {
            "api": tree(self.procs["api"].pid),
            "valkey": tree(self.procs["valkey"].pid),
            "s3": tree(self.procs["weed"].pid),
            "workers": self.worker_pids(),
        }


# --- the history key ---------------------------------------------------------------------


def seed_history(
    stack: Fleet, client: redis.Redis, key: str, key_id: str, count: int, body: dict[str, Any]
) -> str:
    """Give ``key_id`` ``count`` finished jobs: one submitted through the API and run by a
    worker, then its records (hash, event log, entries in the key's two indexes) cloned
    ``count - 1`` times under new ids, older each, with pipelined writes. Returns how."""
    response = httpx.post(
        f"{stack.api_url}/v1/jobs", json=body, headers={"Authorization": key}, timeout=30
    )
    response.raise_for_status()
    template = str(response.json()["id"])
    store = JobStore(client)
    wait_until(lambda: store.get(template).status is JobStatus.SUCCEEDED, 60, "history job")
    fields: dict[str, str] = client.hgetall(job_key(template))  # type: ignore[assignment]
    events: list[str] = client.lrange(events_key(template), 0, -1)  # type: ignore[assignment]
    ttl = int(client.ttl(job_key(template)))
    created = float(fields["created_at"])
    began = time.monotonic()
    chunk = 1000
    hex_id = template.removeprefix("job_")
    for start in range(1, count, chunk):
        members: dict[str, float] = {}
        with client.pipeline(transaction=False) as pipe:
            for index in range(start, min(count, start + chunk)):
                job_id = f"job_{index:032x}"
                new_hex = job_id.removeprefix("job_")
                at = created - index * 0.01
                record = {k: v.replace(hex_id, new_hex) for k, v in fields.items()}
                shift = at - created
                record["created_at"] = f"{at:.6f}"
                for moment in ("started_at", "finished_at"):
                    if record.get(moment, "null") != "null":
                        record[moment] = json.dumps(float(record[moment]) + shift)
                pipe.hset(job_key(job_id), mapping=record)
                pipe.expire(job_key(job_id), ttl)
                if events:
                    pipe.rpush(events_key(job_id), *(e.replace(hex_id, new_hex) for e in events))
                    pipe.expire(events_key(job_id), ttl)
                members[job_id] = at
            pipe.zadd(key_jobs_key(key_id), members)
            pipe.zadd(key_jobs_key(key_id, JobStatus.SUCCEEDED), members)
            pipe.execute()
    return (
        f"{count} finished jobs: 1 run end to end (API, worker, S3), its hash, event log and "
        f"entries in the key's all/succeeded indexes cloned {count - 1} times under new ids "
        f"with pipelined HSET/RPUSH/ZADD in {time.monotonic() - began:.1f}s (no webhooks)"
    )


# --- one phase ---------------------------------------------------------------------------


@dataclass
class Samples:
    """What the phase's threads record."""

    submit: list[float] = field(default_factory=list)
    submit_errors: list[str] = field(default_factory=list)
    listing: list[float] = field(default_factory=list)
    listing_errors: int = 0
    accepted: dict[str, list[str]] = field(default_factory=dict)  # key id -> job ids
    queue: list[tuple[float, int]] = field(default_factory=list)  # (time.time(), depth)
    lock: threading.Lock = field(default_factory=threading.Lock)


def submitter(
    api_url: str, plan: list[tuple[int, str, str, dict[str, Any]]], t0: float, rate: float,
    samples: Samples, stop: threading.Event,
) -> None:  # fmt: skip
    """POST the jobs of ``plan`` (index, key, key id, body), each at ``t0 + index / rate``."""
    with httpx.Client(base_url=api_url, timeout=30) as client:
        for index, key, key_id, body in plan:
            delay = t0 + index / rate - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            began = time.perf_counter()
            try:
                response = client.post("/v1/jobs", json=body, headers={"Authorization": key})
            except httpx.HTTPError as exc:
                with samples.lock:
                    samples.submit_errors.append(type(exc).__name__)
                continue
            elapsed = time.perf_counter() - began
            with samples.lock:
                samples.submit.append(elapsed)
                if response.status_code == 202:
                    samples.accepted.setdefault(key_id, []).append(str(response.json()["id"]))
                else:
                    samples.submit_errors.append(f"{response.status_code} {response.text[:80]}")


def prober(api_url: str, key: str, rate: float, samples: Samples, stop: threading.Event) -> None:
    """``GET /v1/jobs`` (the first page, 20 jobs) of the history key, ``rate`` times a second."""
    with httpx.Client(base_url=api_url, timeout=30, headers={"Authorization": key}) as client:
        while not stop.wait(1 / rate):
            began = time.perf_counter()
            try:
                ok = client.get("/v1/jobs", params={"limit": 20}).status_code == 200
            except httpx.HTTPError:
                ok = False
            with samples.lock:
                if ok:
                    samples.listing.append(time.perf_counter() - began)
                else:
                    samples.listing_errors += 1


def sampler(client: redis.Redis, samples: Samples, stop: threading.Event) -> None:
    """The queued depth once a second: the throughput figure needs a queue that never ran dry."""
    while not stop.wait(1.0):
        with contextlib.suppress(redis.RedisError):
            samples.queue.append((time.time(), int(client.zcard(QUEUED_INDEX))))


def terminal_count(client: redis.Redis, key_ids: list[str]) -> int:
    with client.pipeline(transaction=False) as pipe:
        for key_id in key_ids:
            for status in TERMINAL:
                pipe.zcard(key_jobs_key(key_id, status))
        return sum(int(n) for n in pipe.execute())


def wait_for(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def record_bytes(client: redis.Redis, job_ids: list[str]) -> float | None:
    """Mean MEMORY USAGE of a finished job's own keys: its hash, event log, webhook list,
    and each delivery's hash and attempts list."""
    if not job_ids:
        return None
    with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.lrange(webhooks_key(job_id), 0, -1)
        deliveries: list[list[str]] = pipe.execute()
    with client.pipeline(transaction=False) as pipe:
        for job_id, ids in zip(job_ids, deliveries, strict=True):
            for name in (job_key(job_id), events_key(job_id), webhooks_key(job_id)):
                pipe.memory_usage(name, samples=0)
            for delivery in ids:
                pipe.memory_usage(delivery_key(delivery), samples=0)
                pipe.memory_usage(attempts_key(delivery), samples=0)
        sizes = pipe.execute()
    return sum(int(s or 0) for s in sizes) / len(job_ids)


def webhook_figures(receiver: Receiver, path: str) -> dict[str, Any]:
    received = receiver.at(path)
    lags = []
    for request in received:
        stamp = json.loads(request.body)["timestamp"]
        lags.append(request.at - datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    span = received[-1].at - received[0].at if len(received) > 1 else 0.0
    return {
        "webhook_deliveries": len(received),
        "webhook_deliveries_per_second": round(len(received) / span, 1) if span else None,
        "webhook_lag_p50_ms": ms(pct(lags, 0.5)),
        "webhook_lag_p99_ms": ms(pct(lags, 0.99)),
    }


def run_phase(
    stack: Fleet, args: argparse.Namespace, size: int, jobs: int, receiver: Receiver,
    history_key: str,
) -> dict[str, Any]:  # fmt: skip
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    keys = [KeyStore(client).create(10**9, f"fleet-{size}-{i}", rate=100000.0, max_jobs=jobs + 10)
            for i in range(args.keys)]  # fmt: skip
    ideal = size / args.seconds_per_image
    rate = args.rate or args.overload * ideal
    hook = f"/fleet/{size}"
    body: dict[str, Any] = {
        "tier": TIER, "width": args.size, "height": args.size,
        "webhook_url": receiver.url + hook, "webhook_events": args.webhook_events,
    }  # fmt: skip
    if args.steps:
        body["steps"] = args.steps
    plan = [
        (i, keys[i % len(keys)][0], keys[i % len(keys)][1].id,
         {**body, "prompt": f"fleet {size} job {i}", "seed": i})
        for i in range(jobs)
    ]  # fmt: skip

    # The fleet idle, to tell its standing chatter (heartbeats, polls) from per-job cost.
    idle_before = valkey_cpu(client)
    time.sleep(args.idle_seconds)
    idle_rate = (valkey_cpu(client) - idle_before) / args.idle_seconds

    samples, stop = Samples(), threading.Event()
    groups = stack.groups()
    cpu0 = {name: cpu_seconds(pids) for name, pids in groups.items()}
    bench0, machine0 = sum(os.times()[:2]), machine_busy()
    valkey_cpu0, memory0 = valkey_cpu(client), valkey_memory(client)
    began = time.monotonic()
    wall0 = time.time()
    threads = [
        threading.Thread(target=submitter, args=(stack.api_url, plan[c :: args.clients], began,
                         rate, samples, stop), daemon=True)
        for c in range(args.clients)
    ]  # fmt: skip
    side = [
        threading.Thread(target=prober, args=(stack.api_url, history_key, args.list_rate,
                         samples, stop), daemon=True),
        threading.Thread(target=sampler, args=(client, samples, stop), daemon=True),
    ]  # fmt: skip
    for thread in threads + side:
        thread.start()
    say(f"fleet {size}: submitting {jobs} jobs at {rate:.1f}/s from {args.keys} keys")
    for thread in threads:
        thread.join(jobs / rate + 120)
    submitted = time.monotonic()
    key_ids = [record.id for _, record in keys]
    accepted = sum(len(ids) for ids in samples.accepted.values())
    budget = accepted * args.seconds_per_image / size * 2 + 120
    if not wait_for(lambda: terminal_count(client, key_ids) >= accepted, budget):
        say(f"fleet {size}: jobs still not ended after {budget:.0f}s")
    per_job = len(args.webhook_events)
    wait_for(lambda: len(receiver.at(hook)) >= accepted * per_job, 60)
    stop.set()
    for thread in side:
        thread.join(10)
    elapsed = time.monotonic() - began
    cpu1 = {name: cpu_seconds(pids) for name, pids in stack.groups().items()}
    bench1, machine1 = sum(os.times()[:2]), machine_busy()
    valkey_spent, memory1 = valkey_cpu(client) - valkey_cpu0, valkey_memory(client)

    ids = [job_id for key_ids_ in samples.accepted.values() for job_id in key_ids_]
    store = JobStore(client)
    records = [job for start in range(0, len(ids), 500) for job in store.get_many(ids[start : start + 500])]  # fmt: skip
    succeeded = [job for job in records if job is not None and job.status is JobStatus.SUCCEEDED]
    finishes = sorted(job.finished_at for job in succeeded if job.finished_at is not None)
    sustained = None
    if len(finishes) >= 10:
        low, high = finishes[len(finishes) // 10], finishes[(len(finishes) * 9) // 10]
        sustained = (len(finishes) * 9 // 10 - len(finishes) // 10) / max(1e-9, high - low)
        steady = [depth for at, depth in samples.queue if low <= at <= high]
    else:
        steady = [depth for _, depth in samples.queue]
    done = len(succeeded)
    machine_share = (machine1[0] - machine0[0]) / max(1e-9, machine1[1] - machine0[1])
    figures: dict[str, Any] = {
        "workers": size,
        "jobs": jobs,
        "accepted": accepted,
        "succeeded": done,
        "not_succeeded": len(ids) - done,
        "submit_errors": len(samples.submit_errors),
        "submit_error_examples": sorted(set(samples.submit_errors))[:3],
        "seconds_per_image": args.seconds_per_image,
        "submit_rate": round(rate, 2),
        "ideal_jobs_per_second": round(ideal, 2),
        "sustained_jobs_per_second": None if sustained is None else round(sustained, 2),
        "ratio": None if sustained is None else round(sustained / ideal, 3),
        "submit_seconds": round(submitted - began, 1),
        "phase_seconds": round(elapsed, 1),
        "queue_min_steady": min(steady) if steady else None,
        "queue_max": max((d for _, d in samples.queue), default=None),
        "valkey_cpu_seconds_per_1000_jobs": round(valkey_spent / max(1, done) * 1000, 3),
        "valkey_cpu_seconds_per_1000_jobs_net_of_idle": round(
            max(0.0, valkey_spent - idle_rate * elapsed) / max(1, done) * 1000, 3
        ),
        "valkey_idle_cpu_percent": round(100 * idle_rate, 2),
        "valkey_bytes_per_job": round((memory1 - memory0) / max(1, done)),
        "valkey_bytes_per_job_record": round(record_bytes(client, [j.id for j in succeeded[:50]]) or 0),
        "submit_p50_ms": ms(pct(samples.submit, 0.5)),
        "submit_p99_ms": ms(pct(samples.submit, 0.99)),
        "list_jobs_p50_ms": ms(pct(samples.listing, 0.5)),
        "list_jobs_p99_ms": ms(pct(samples.listing, 0.99)),
        "list_jobs_samples": len(samples.listing),
        "list_jobs_errors": samples.listing_errors,
        **webhook_figures(receiver, hook),
        "webhook_deliveries_expected": accepted * per_job,
        "cpu_percent_of_one_core": {
            **{name: round(100 * (cpu1[name] - cpu0[name]) / elapsed, 1) for name in cpu1},
            "bench": round(100 * (bench1 - bench0) / elapsed, 1),
        },
        "machine_cpu_percent": round(100 * machine_share, 1),
        "worker_rss_mib": round(rss_bytes(stack.worker_pids()) / 2**20),
        "worker_pss_mib": round(pss_bytes(stack.worker_pids()) / 2**20),
        "started_at": wall0,
    }  # fmt: skip
    figures["worker_pss_mib_each"] = round(figures["worker_pss_mib"] / size, 1)
    return figures


# --- the report --------------------------------------------------------------------------


#: Each component's ceiling, in % of one core: Valkey runs commands on one thread, each API
#: process on one (the GIL), and the machine has its cores.
def ceilings(args: argparse.Namespace) -> dict[str, float]:
    cores = os.cpu_count() or 1
    return {"valkey": 100.0, "api": 100.0 * args.api_workers, "machine": 100.0 * cores}


def breaking_points(phases: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per component, the fleet size at which its CPU would reach its ceiling, at the cost
    per worker the largest size measured (linear: each worker adds jobs at a fixed rate)."""
    last = phases[-1]
    size = last["workers"]
    shares = {**last["cpu_percent_of_one_core"], "machine": last["machine_cpu_percent"]}
    found = {}
    for name, ceiling in ceilings(args).items():
        used = shares.get(name, 0.0)
        found[name] = {
            "cpu_percent": used,
            "ceiling_percent": ceiling,
            "saturates_at_workers": round(size * ceiling / used) if used > 0 else None,
        }
    return found


LINES: list[tuple[str, str, str]] = [
    ("sustained_jobs_per_second", "sustained jobs/s", ""),
    ("ideal_jobs_per_second", "ideal jobs/s (workers / s per image)", ""),
    ("ratio", "sustained / ideal", ""),
    ("queue_min_steady", "queued jobs, least while measuring (0: starved)", ""),
    ("valkey_cpu_seconds_per_1000_jobs", "Valkey CPU s per 1000 jobs", ""),
    ("valkey_cpu_seconds_per_1000_jobs_net_of_idle", "Valkey CPU s per 1000 jobs, net of idle", ""),
    ("valkey_idle_cpu_percent", "Valkey CPU with the fleet idle", " %"),
    ("valkey_bytes_per_job", "Valkey bytes per job (used_memory delta)", ""),
    ("valkey_bytes_per_job_record", "Valkey bytes per finished job's keys", ""),
    ("submit_p50_ms", "submit latency p50", " ms"),
    ("submit_p99_ms", "submit latency p99", " ms"),
    ("list_jobs_p50_ms", "GET /v1/jobs p50 (history key)", " ms"),
    ("list_jobs_p99_ms", "GET /v1/jobs p99 (history key)", " ms"),
    ("webhook_deliveries_per_second", "webhook deliveries/s", ""),
    ("webhook_lag_p99_ms", "webhook lag p99", " ms"),
    ("machine_cpu_percent", "machine CPU", " %"),
    ("worker_pss_mib_each", "worker memory each (PSS, parent + child)", " MiB"),
]


def report(result: dict[str, Any]) -> None:
    for phase in result["phases"]:
        size = phase["workers"]
        print(f"fleet {size}: {phase['succeeded']}/{phase['jobs']} jobs succeeded, "
              f"{phase['submit_errors']} submit errors", flush=True)  # fmt: skip
        for key, label, unit in LINES:
            print(f"fleet {size}: {label}: {phase[key]}{unit}")
        for name, share in phase["cpu_percent_of_one_core"].items():
            print(f"fleet {size}: {name} CPU: {share} % of one core")
    if len(result["phases"]) > 1:
        for key, label, unit in LINES:
            trend = " -> ".join(f"{p[key]}{unit} ({p['workers']})" for p in result["phases"])
            print(f"trend {label}: {trend}")
    for name, point in result["breaking_points"].items():
        print(
            f"{name}: {point['cpu_percent']} % of its {point['ceiling_percent']:.0f} % ceiling, "
            f"saturates at about {point['saturates_at_workers']} workers"
        )
    print(f"breaks first: {result['breaks_first']}")


def sizes_of(args: argparse.Namespace) -> list[int]:
    if not args.sizes:
        return [args.workers]
    return sorted({int(s) for s in args.sizes.split(",") if s.strip()})


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=32, help="Fleet size without --sizes.")
    parser.add_argument("--sizes", help="Fleet sizes to run in turn, e.g. 8,16,32.")
    parser.add_argument("--jobs", type=int, default=10_000, help="Jobs at the largest size.")
    parser.add_argument("--keys", type=int, default=4, help="Keys the jobs come from.")
    parser.add_argument("--seconds-per-image", type=float, default=1.5)
    parser.add_argument("--steps", type=int, help="Steps per job (the tier's default if not).")
    parser.add_argument("--size", type=int, default=64, help="Image side in pixels.")
    parser.add_argument(
        "--overload", type=float, default=1.2, help="Submit rate as a multiple of the ideal."
    )
    parser.add_argument("--rate", type=float, help="Submit rate (jobs/s); overrides --overload.")
    parser.add_argument("--clients", type=int, default=4, help="Submitting threads.")
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--history", type=int, default=100_000, help="Jobs of the history key.")
    parser.add_argument("--list-rate", type=float, default=2.0, help="GET /v1/jobs per second.")
    parser.add_argument(
        "--webhook-events", type=lambda s: s.split(","),
        default=["job.queued", "job.started", "job.succeeded"],
    )  # fmt: skip
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "fleet.json")
    parser.add_argument("--keep", help="Keep the servers' data and logs in this directory.")
    args = parser.parse_args()
    sizes = sizes_of(args)
    # A SIGTERM (timeout, CI) still stops every server and worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="sdq-fleet-") as tmp:
        home = Path(args.keep) if args.keep else Path(tmp)
        home.mkdir(parents=True, exist_ok=True)
        stack = Fleet(args, home)
        receiver = Receiver()
        try:
            return run(stack, receiver, args, sizes)
        finally:
            stack.stop()
            receiver.close()


def run(stack: Fleet, receiver: Receiver, args: argparse.Namespace, sizes: list[int]) -> int:
    stack.start_valkey()
    stack.start_s3()
    stack.start_api(args.api_workers)
    say("valkey, s3 and the api up")
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    history_key, history = KeyStore(client).create(10**9, "history", rate=100000.0)
    result: dict[str, Any] = {"conditions": conditions(args, sizes), "phases": []}
    for number, size in enumerate(sizes):
        ready = stack.grow(size)
        say(f"{size} workers ready in {ready:.1f}s")
        if number == 0:
            body = {"prompt": "history", "tier": TIER, "width": args.size, "height": args.size}
            result["history_seeding"] = seed_history(
                stack, client, history_key, history.id, args.history, body
            )
            say(result["history_seeding"])
        jobs = max(1, round(args.jobs * size / sizes[-1]))
        phase = run_phase(stack, args, size, jobs, receiver, history_key)
        phase["workers_ready_seconds"] = round(ready, 1)
        result["phases"].append(phase)
        say(f"fleet {size}: done in {phase['phase_seconds']}s")
    heavy = stack.heavy_imports()
    result["workers_importing_torch"] = heavy
    result["breaking_points"] = breaking_points(result["phases"], args)
    points = [(p["saturates_at_workers"], name) for name, p in result["breaking_points"].items()]
    result["breaks_first"] = min((p for p in points if p[0] is not None), default=(0, None))[1]
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    print(f"workers that imported torch or diffusers: {len(heavy)}")
    print(f"written to {args.json}")
    ok = not heavy and all(
        p["succeeded"] == p["jobs"] and p["submit_errors"] == 0 for p in result["phases"]
    )
    return 0 if ok else 1


def conditions(args: argparse.Namespace, sizes: list[int]) -> dict[str, Any]:
    return {
        "sizes": sizes,
        "jobs_at_largest": args.jobs,
        "keys": args.keys,
        "seconds_per_image": args.seconds_per_image,
        "steps": args.steps or "tier default",
        "image_side": args.size,
        "submit_rate": args.rate or f"{args.overload} x ideal",
        "clients": args.clients,
        "api_workers": args.api_workers,
        "history_jobs": args.history,
        "webhook_events": args.webhook_events,
        "tier": TIER,
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": sys.version.split()[0],
        "when": datetime.now().isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    sys.exit(main())
