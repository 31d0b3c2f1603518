"""Chaos: submit jobs while killing workers and the API, stopping Valkey and S3, then count.

Everything runs on loopback: its own Valkey (AOF on), its own SeaweedFS, the API, worker
processes (prefork, one child, each with its share of the cores) and a webhook receiver;
the broker is that Valkey, or ``--broker`` (RabbitMQ, with queues of the run's own, deleted
at the end). The visibility timeout is the default (an hour): a job whose worker died is
taken over when its lease runs out (``--lease``, a few seconds here) and the reconciler
requeues it.

The jobs are paced over the run: single submits and batches through ``/v1/jobs`` and
``/v1/batches`` (an Idempotency-Key each, retried until accepted), and synchronous Hotpot
waits (``POST /stable-diffusion-budget``, on a key of their own, retried with the same
Idempotency-Key until they answer with the image). Faults are spread over the run and
logged with their time: pool children and worker processes killed with -9 (a worker holding
a lease when one does), Valkey restarted, Valkey stopped for longer than any client retries,
S3 stopped, the API killed with -9 during sync waits and a batch submit, and during a burst
of submits (between charge and publish, with RabbitMQ). The last line reads

    300 submitted, 44 faults, 0 lost, 0 stuck, D duplicate executions, 0 duplicate charges,
    0 duplicate objects, 0 unpaid refunds, 300 unique succeeded webhook ids

(lost: not terminal at the end; stuck: not terminal 60 s after the last fault; an unpaid
refund: a failed or canceled job not refunded, or credits back for a job that did not
fail), and the exit status is non-zero if anything was lost, stuck, charged, stored or
refunded wrong. Before it: how long the jobs of killed workers waited to start again.
``--canary`` adds a long job whose worker is stopped (SIGSTOP) past its lease, so that the
other worker takes it over while the first still holds it: D must then be above 0, which
proves the harness sees duplicates.

    python bench/chaos.py                 # the full run (make chaos)
    python bench/chaos.py --broker amqp://guest:guest@127.0.0.1:5672//
    python bench/chaos.py --jobs 30 --child-kills 1 --main-kills 1 --valkey-restarts 1 \\
        --valkey-outages 0 --api-kills 1 --burst-kills 1 --s3-stops 0 --sync 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.localstack import SDQ, T0, LocalStack, OwnQueues, children, say  # noqa: E402
from common.apikeys import KeyStore  # noqa: E402
from common.job import Job, JobStatus  # noqa: E402
from common.redis_keys import RUNNING_KEY, job_key, key_jobs_key  # noqa: E402
from common.settings import Settings  # noqa: E402
from common.storage import S3Storage  # noqa: E402
from common.store import JobStore  # noqa: E402
from tests.receiver import Receiver  # noqa: E402
from tests.support import wait_until  # noqa: E402

#: A worker's log line as a pool child starts a run.
_ATTEMPT = re.compile(rb"job (job_[0-9a-f]+): attempt (\d+) on tier")
#: The chaos run's delivery cap, and the kills one job's runs may take below it.
MAX_DELIVERIES = 6
HITS_PER_JOB = MAX_DELIVERIES - 2


@dataclass
class Fault:
    at: float  # time.time()
    kind: str
    message: str


@dataclass
class Takeover:
    """A run killed (or stopped) while it held its job's lease, at ``at`` (time.time())."""

    at: float
    kind: str
    job_id: str


@dataclass
class Work:
    """Jobs to submit: one (``/v1/jobs``) or several (``/v1/batches``), by their index."""

    indices: list[int]
    batch: bool = False


@dataclass
class Sync:
    """The synchronous Hotpot waits: how many answered with an image, after how many tries."""

    answered: int = 0
    retried: int = 0
    errors: list[str] = field(default_factory=list)
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def duplicate_causes(store: JobStore, jobs: list[Job | None], faults: list[Fault]) -> Counter[str]:
    """Each re-run of a job, put down to the first fault between its previous start and this
    one (the one that cut the run short; later faults may fall in between too): at-least-once
    promises a re-run only after a kill, a restart or an outage."""
    causes: Counter[str] = Counter()
    for job in jobs:
        if job is None or job.attempts < 2:
            continue
        for previous, again in itertools.pairwise(starts(store, job.id)):
            between = [fault for fault in faults if previous <= fault.at <= again]
            causes[between[0].kind if between else "no fault (a lease ran out)"] += 1
            if not between:
                say(
                    f"job {job.id} started again {again - previous:.1f}s later with no fault between"
                )
    return causes


def starts(store: JobStore, job_id: str) -> list[float]:
    return [
        datetime.fromisoformat(event["timestamp"]).timestamp()
        for event in store.events(job_id)
        if event["type"] == "job.started"
    ]


def takeover_waits(store: JobStore, takeovers: list[Takeover]) -> dict[str, list[float]]:
    """By kind of fault: the seconds from each kill of a run holding a lease to the job's
    next start (another worker's, or the restarted one's)."""
    waits: dict[str, list[float]] = {}
    for takeover in takeovers:
        later = [t for t in starts(store, takeover.job_id) if t > takeover.at]
        if later:
            waits.setdefault(takeover.kind, []).append(later[0] - takeover.at)
        elif store.get(takeover.job_id).status is not JobStatus.SUCCEEDED:
            say(f"job {takeover.job_id}: never started again after its {takeover.kind}")
    return waits


def plain_options(workers: int, api_workers: int) -> argparse.Namespace:
    """The harness's options for a stack with sdq's own lease and reconcile interval and no
    faults: what ``bench/bench.py`` and ``bench/load.py`` measure."""
    fields = Settings.model_fields
    return argparse.Namespace(
        workers=workers,
        api_workers=api_workers,
        visibility_timeout=None,
        lease=fields["lease_seconds"].default,
        reconcile_interval=fields["reconcile_interval_seconds"].default,
    )


class Harness(LocalStack):
    def __init__(self, args: argparse.Namespace, home: Path, queues: OwnQueues | None) -> None:
        extra = {
            "SDQ_LEASE_SECONDS": str(args.lease),
            "SDQ_RECONCILE_INTERVAL_SECONDS": str(args.reconcile_interval),
            "SDQ_MAX_DELIVERIES": str(MAX_DELIVERIES),
            "SDQ_WEBHOOK_RETRY_BASE_SECONDS": "0.5",
            "SDQ_WEBHOOK_RETRY_MAX_SECONDS": "5",
            # The harness's own bursts are not what the per-key rate is for.
            "SDQ_DEFAULT_RATE_PER_SECOND": "1000",
            **(queues.env if queues else {}),
        }
        if args.visibility_timeout is not None:
            extra["SDQ_VISIBILITY_TIMEOUT_SECONDS"] = str(args.visibility_timeout)
        if args.workers > 1:
            # Each worker's torch would start one thread per core: two workers on two cores
            # then run four spinning threads on two, and a job of 0.3 s took 1-3 s, some 17 s.
            # One worker's share of the cores each, as a machine with a device per worker
            # would have.
            share = max(1, (os.cpu_count() or 1) // args.workers)
            extra["OMP_NUM_THREADS"] = str(share)
        super().__init__(home, "chaos", extra)
        self.args = args
        self.faults: list[Fault] = []
        self.takeovers: list[Takeover] = []
        self.hits: Counter[str] = Counter()  # kills aimed at each job's runs
        self.last_fault_end = time.monotonic()
        self.sync = Sync()
        #: Submits a fault starts (a batch, a burst), each a list of job ids when done.
        self.fault_submits: list[Future[list[str]]] = []
        self.submit_pool = ThreadPoolExecutor(24)
        self.submit: Callable[[Work], list[str]] = lambda work: []
        self.reserved: dict[str, list[Work]] = {"api kill": [], "burst kill": []}

    # --- processes -------------------------------------------------------------------
    def start_worker(self, index: int) -> None:
        name = f"worker{index}"
        self.spawn(
            name,
            [*SDQ, "worker", "--tier", "budget", "--tier", "normal", "--name", f"{name}@chaos"],
        )

    def start(self) -> None:
        subprocess.run([*SDQ, "models", "build-tiny", str(self.model_dir)], env=self.env,
                       check=True, capture_output=True)  # fmt: skip
        self.start_valkey()
        self.start_s3()
        self.start_api(getattr(self.args, "api_workers", 1))
        for index in range(self.args.workers):
            self.start_worker(index)
        wait_until(lambda: all("ready." in (self.home / f"worker{i}.log").read_text()
                          for i in range(self.args.workers)), 120, "workers")  # fmt: skip

    def workers(self) -> list[str]:
        return [name for name in list(self.procs) if name.startswith("worker")]

    def holders(self) -> dict[str, tuple[str, int]]:
        """Worker name -> (job id, pid) of the run it holds a lease for, by the store and
        the worker's log."""
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        held: dict[str, tuple[str, int]] = {}
        running = {str(job_id) for job_id in client.zrange(RUNNING_KEY, 0, -1)}
        recorded = {job_id: client.hget(job_key(job_id), "lease_holder") for job_id in running}
        for name in self.workers():
            pids = [self.procs[name].pid, *children(self.procs[name].pid)]
            for job_id, holder in recorded.items():
                pid = json.loads(holder).rpartition(":")[2] if holder else ""
                if pid.isdigit() and int(pid) in pids:
                    held[name] = (job_id, int(pid))
            if name in held or all(recorded.values()):
                continue
            # No holder recorded: the last run the worker's log names since it started.
            with open(self.home / f"{name}.log", "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 20_000))
                tail = log.read()
            found = list(_ATTEMPT.finditer(tail))
            if found and found[-1].start() > tail.rfind(b" ready."):
                job_id, attempt = found[-1][1].decode(), found[-1][2].decode()
                if job_id in running and client.hget(job_key(job_id), "attempts") == attempt:
                    held[name] = (job_id, pids[-1])
        return held

    def wait_for_holder(self, seconds: float = 5) -> dict[str, tuple[str, int]]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if held := self.holders():
                    return held
            except (redis.RedisError, OSError, KeyError):  # a process or Valkey restarting
                pass
            time.sleep(0.1)
        return {}

    def target(self, seconds: float) -> tuple[str | None, dict[str, tuple[str, int]]]:
        """A worker to kill, and the runs held: one holding a run when there is one, but
        never a run already killed HITS_PER_JOB times (else the delivery cap fails it by
        design: a poison job, which tests/e2e/test_poison.py covers, not a lost one)."""
        held = self.wait_for_holder(seconds)
        spared = {
            name for name, (job_id, _pid) in held.items() if self.hits[job_id] >= HITS_PER_JOB
        }
        aimed = [name for name in held if name not in spared]
        idle = [name for name in self.workers() if name not in spared]
        name = random.choice(aimed or idle) if aimed or idle else None
        if name in held:
            self.hits[held[name][0]] += 1
        return name, held

    # --- faults ----------------------------------------------------------------------
    def fault(self, kind: str, message: str) -> None:
        self.faults.append(Fault(time.time(), kind, message))
        say(f"FAULT {len(self.faults)}: {message}")

    def kill_child(self) -> None:
        name, held = self.target(2)
        if name is None:
            self.fault("no target", "every worker holds a run killed too often already")
            return
        pool = children(self.procs[name].pid)
        if not pool:
            self.fault("no child", f"{name} had no pool child to kill (restarting)")
            return
        pid = random.choice(pool)
        os.kill(pid, signal.SIGKILL)
        job_id = held[name][0] if name in held and held[name][1] == pid else None
        if job_id:
            self.takeovers.append(Takeover(time.time(), "pool child kill", job_id))
        self.fault("pool child kill", f"SIGKILL pool child {pid} of {name}{running(job_id)}")

    def kill_main(self) -> None:
        name, held = self.target(5)
        if name is None:
            self.fault("no target", "every worker holds a run killed too often already")
            return
        job_id = held[name][0] if name in held else None
        self.kill(name, signal.SIGKILL)
        if job_id:
            self.takeovers.append(Takeover(time.time(), "worker kill -9", job_id))
        self.fault(
            "worker kill -9",
            f"kill -9 of {name}'s main process and its pool{running(job_id)}; restarted",
        )
        self.start_worker(int(name.removeprefix("worker")))

    def restart_valkey(self) -> None:
        self.kill("valkey", signal.SIGTERM)
        self.fault("Valkey restart", "Valkey stopped (SIGTERM, AOF flushed) and restarted")
        self.start_valkey()

    def valkey_outage(self) -> None:
        seconds = self.args.valkey_outage_seconds
        self.kill("valkey", signal.SIGTERM)
        self.fault("Valkey outage", f"Valkey stopped (SIGTERM) for {seconds:.0f} s")
        time.sleep(seconds)
        self.start_valkey()
        say("Valkey back")

    def stop_s3(self) -> None:
        pid = self.procs["weed"].pid
        os.killpg(pid, signal.SIGSTOP)
        self.fault("S3 stop", "S3 server stopped (SIGSTOP) for 5 s")
        time.sleep(5)
        os.killpg(pid, signal.SIGCONT)

    def restart_api(self) -> None:
        self.start_api(getattr(self.args, "api_workers", 1))
        say("API back")

    def kill_api(self) -> None:
        """kill -9 the API while sync waits and a batch submit are in flight."""
        work = self.reserved["api kill"].pop() if self.reserved["api kill"] else None
        if work:
            self.fault_submits.append(self.submit_pool.submit(self.submit, work))
            time.sleep(random.uniform(0.01, 0.08))
        waits = self.sync.in_flight
        self.kill("api", signal.SIGKILL)
        batch = f"a batch of {len(work.indices)}" if work else "no batch"
        self.fault(
            "API kill -9", f"kill -9 of the API with {waits} sync waits and {batch} in flight"
        )
        self.restart_api()

    def kill_api_in_burst(self) -> None:
        """kill -9 the API during a burst of submits: some between charge and publish."""
        burst = self.reserved["burst kill"].pop() if self.reserved["burst kill"] else None
        singles = [Work([index]) for index in burst.indices] if burst else []
        for work in singles:
            self.fault_submits.append(self.submit_pool.submit(self.submit, work))
        time.sleep(random.uniform(0.02, 0.15))
        self.kill("api", signal.SIGKILL)
        self.fault(
            "API kill -9 in a burst", f"kill -9 of the API during a burst of {len(singles)} submits"
        )
        self.restart_api()

    def stall_canary(self, canary: str) -> None:
        """SIGSTOP the worker running ``canary`` past its lease, then SIGCONT it: the other
        worker takes the job over while the first still holds a run of it."""
        deadline = time.monotonic() + 120
        held = []
        while not held and time.monotonic() < deadline:
            found = self.wait_for_holder(1)
            held = [name for name, (job_id, _) in found.items() if job_id == canary]
        if not held:
            say("canary: never saw it running")
            return
        name = held[0]
        seconds = self.args.lease + 3 * self.args.reconcile_interval + 4
        os.killpg(self.procs[name].pid, signal.SIGSTOP)
        self.takeovers.append(Takeover(time.time(), "worker stall", canary))
        self.fault(
            "worker stall", f"{name} stopped (SIGSTOP) for {seconds:.0f} s running the canary"
        )
        time.sleep(seconds)
        os.killpg(self.procs[name].pid, signal.SIGCONT)
        self.last_fault_end = time.monotonic()

    def supervise(self, done: threading.Event) -> None:
        """Restart a worker that exited by itself, as its supervisor would: Celery exits
        when a pool child dies while it starts ("Could not start worker processes")."""
        while not done.wait(1):
            for name, proc in list(self.procs.items()):
                if name.startswith("worker") and proc.poll() is not None:
                    say(f"{name} exited by itself (status {proc.returncode}); restarted")
                    self.procs.pop(name, None)
                    self.start_worker(int(name.removeprefix("worker")))

    def run_faults(self, span: float, done: threading.Event) -> None:
        a = self.args
        plan = (
            [self.kill_child] * a.child_kills + [self.kill_main] * a.main_kills
            + [self.restart_valkey] * a.valkey_restarts + [self.valkey_outage] * a.valkey_outages
            + [self.stop_s3] * a.s3_stops + [self.kill_api] * a.api_kills
            + [self.kill_api_in_burst] * a.burst_kills
        )  # fmt: skip
        random.shuffle(plan)
        if not plan:
            return
        gap = span / (len(plan) + 1)
        for fault in plan:
            if done.wait(gap):
                return
            try:
                fault()
            except Exception as exc:  # a fault that could not be made is logged, not fatal
                say(f"fault {fault.__name__} failed: {exc}")
            self.last_fault_end = time.monotonic()


def running(job_id: str | None) -> str:
    return f" (running {job_id}, holding its lease)" if job_id else " (no run holding a lease)"


def post_until_accepted(
    api_url: str, key: str, path: str, body: dict[str, Any], token: str
) -> dict[str, Any]:
    """POST until it is accepted (202); the Idempotency-Key makes the retries safe."""
    deadline = time.monotonic() + 300
    while True:
        try:
            response = httpx.post(
                f"{api_url}{path}",
                json=body,
                headers={"Authorization": key, "Idempotency-Key": token},
                timeout=60,
            )
            if response.status_code == 202:
                return dict(response.json())
            error = f"{response.status_code} {response.text[:120]}"
        except httpx.HTTPError as exc:
            error = str(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{token} never accepted: {error}")
        time.sleep(0.5)


def submitter(api_url: str, key: str, bodies: list[dict[str, Any]]) -> Callable[[Work], list[str]]:
    def submit(work: Work) -> list[str]:
        if not work.batch:
            index = work.indices[0]
            body = bodies[index]
            return [
                str(post_until_accepted(api_url, key, "/v1/jobs", body, f"chaos-{index}")["id"])
            ]
        batch = {"jobs": [bodies[i] for i in work.indices]}
        token = f"chaos-batch-{work.indices[0]}"
        return [
            str(job["id"])
            for job in post_until_accepted(api_url, key, "/v1/batches", batch, token)["jobs"]
        ]

    return submit


def sync_wait(api_url: str, key: str, index: int, steps: int, sync: Sync) -> None:
    """One Hotpot-compatible wait, retried (same Idempotency-Key) until it answers an image."""
    deadline = time.monotonic() + 400
    fields = {"inputText": f"sync {index}", "steps": str(steps), "seed": str(index)}
    headers = {"Authorization": key, "Idempotency-Key": f"sync-{index}"}
    tries = 0
    while True:
        tries += 1
        with sync.lock:
            sync.in_flight += 1
        try:
            response = httpx.post(
                f"{api_url}/stable-diffusion-budget", data=fields, headers=headers, timeout=120
            )
            if response.status_code == 200 and response.content:
                with sync.lock:
                    sync.answered += 1
                    sync.retried += tries > 1
                return
            error = f"{response.status_code} {response.text[:160]}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            with sync.lock:
                sync.in_flight -= 1
        if time.monotonic() > deadline:
            with sync.lock:
                sync.errors.append(f"sync-{index}: {error}")
            return
        time.sleep(0.5)


def plan_work(args: argparse.Namespace) -> tuple[list[Work], dict[str, list[Work]]]:
    """The jobs' indices as paced submits (singles and batches) and the faults' own submits
    (a batch for each API kill, a burst for each burst kill), at most half of the jobs."""
    indices = list(range(args.jobs))
    reserved: dict[str, list[Work]] = {"api kill": [], "burst kill": []}
    budget = args.jobs // 2
    for kind, count, size in (
        ("api kill", args.api_kills, args.batch_size),
        ("burst kill", args.burst_kills, args.burst_size),
    ):
        for _ in range(count):
            take = min(size, budget)
            budget -= take
            if take:
                reserved[kind].append(Work([indices.pop() for _ in range(take)], batch=True))
    paced: list[Work] = []
    batches = args.batches
    while indices:
        if batches and random.random() < 0.1 and len(indices) >= args.batch_size:
            batches -= 1
            paced.append(Work([indices.pop(0) for _ in range(args.batch_size)], batch=True))
        else:
            paced.append(Work([indices.pop(0)]))
    return paced, reserved


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--child-kills", type=int, default=30)
    parser.add_argument("--main-kills", type=int, default=5)
    parser.add_argument("--valkey-restarts", type=int, default=3)
    parser.add_argument(
        "--valkey-outages", type=int, default=1,
        help="Valkey stopped for --valkey-outage-seconds while jobs run (0 skips it: it is long).",
    )  # fmt: skip
    parser.add_argument("--valkey-outage-seconds", type=float, default=60)
    parser.add_argument("--s3-stops", type=int, default=1)
    parser.add_argument("--api-kills", type=int, default=2, help="During sync waits and a batch.")
    parser.add_argument("--burst-kills", type=int, default=2, help="During a burst of submits.")
    parser.add_argument("--batches", type=int, default=4, help="Paced batches among the submits.")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--burst-size", type=int, default=20)
    parser.add_argument("--sync", type=int, default=30, help="Synchronous Hotpot waits.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lease", type=float, default=5, help="SDQ_LEASE_SECONDS.")
    parser.add_argument("--reconcile-interval", type=float, default=1)
    parser.add_argument(
        "--visibility-timeout", type=int, default=None,
        help="SDQ_VISIBILITY_TIMEOUT_SECONDS; sdq's default (an hour) if not given.",
    )  # fmt: skip
    parser.add_argument(
        "--broker", help="A broker URL (amqp://...); the job store's Valkey if not given."
    )
    parser.add_argument(
        "--canary", action="store_true", help="Add a long job whose worker stalls past its lease."
    )
    parser.add_argument("--stuck-after", type=float, default=60)
    parser.add_argument(
        "--timeout", type=float, default=300, help="Seconds to wait for the jobs after the faults."
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", help="Keep the servers' data and logs in this directory.")
    args = parser.parse_args()
    random.seed(args.seed)
    # A SIGTERM (timeout, CI) still stops the servers and deletes the queues.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with tempfile.TemporaryDirectory(prefix="sdq-chaos-") as tmp:
        home = Path(args.keep) if args.keep else Path(tmp)
        home.mkdir(parents=True, exist_ok=True)
        queues = (
            OwnQueues(args.broker, home, f"chaos-{uuid.uuid4().hex[:8]}") if args.broker else None
        )
        harness = Harness(args, home, queues)
        receiver = Receiver()
        try:
            harness.start()
            say("stack up" + (f", broker {args.broker}" if args.broker else ""))
            return run(harness, receiver, args)
        finally:
            harness.stop()
            harness.submit_pool.shutdown(wait=False, cancel_futures=True)
            receiver.close()
            if queues:
                queues.delete()


def run(harness: Harness, receiver: Receiver, args: argparse.Namespace) -> int:
    client = redis.Redis.from_url(harness.redis_url, decode_responses=True)
    keys = KeyStore(client)
    key, record = keys.create(100_000)
    sync_key, sync_record = keys.create(100_000)
    start_credits = {record.id: record.credits, sync_record.id: sync_record.credits}
    hook = receiver.url + "/chaos"
    bodies = [
        {"prompt": f"chaos {i}", "tier": "budget", "steps": args.steps, "seed": i,
         "webhook_url": hook, "webhook_events": ["job.succeeded"]}
        for i in range(args.jobs)
    ]  # fmt: skip
    paced, harness.reserved = plan_work(args)
    if args.canary:
        # Long enough to be caught running: its worker is stopped past the lease.
        canary = {"prompt": "canary", "tier": "normal", "steps": 12, "width": 256, "height": 256}
        bodies.append({**canary, "webhook_url": hook, "webhook_events": ["job.succeeded"]})
        paced.insert(0, Work([len(bodies) - 1]))
    harness.submit = submit = submitter(harness.api_url, key, bodies)
    done = threading.Event()
    # Spread the submits and the faults over twice the time the jobs take (two workers of
    # one torch thread each, about 0.5 s a job), so that faults land on busy workers and the
    # backlog at the last fault is the faults' doing: 60 s after it then measures stuck jobs,
    # not how fast this machine drains a queue submitted at its full rate.
    span = max(10.0, args.jobs * 0.5)
    faults = threading.Thread(target=harness.run_faults, args=(span, done), daemon=True)
    faults.start()
    threading.Thread(target=harness.supervise, args=(done,), daemon=True).start()
    extra: list[threading.Thread] = []
    if args.canary:
        first = submit(paced.pop(0))[0]
        stall = threading.Thread(target=harness.stall_canary, args=(first,), daemon=True)
        stall.start()
        extra.append(stall)
    waits = ThreadPoolExecutor(2)
    sync_futures = []
    for index in range(args.sync):
        sync_futures.append(
            waits.submit(sync_wait, harness.api_url, sync_key, index, args.steps, harness.sync)
        )
    ids: list[str] = [first] if args.canary else []
    futures = []
    began = time.monotonic()
    for number, work in enumerate(paced):
        time.sleep(max(0.0, began + span * number / max(1, len(paced)) - time.monotonic()))
        futures.append(harness.submit_pool.submit(submit, work))
    for future in futures:
        ids += future.result()
    faults.join()
    for future in harness.fault_submits:
        ids += future.result()
    say(f"{len(ids)} jobs accepted; faults over")
    store = JobStore(client)
    deadline = time.monotonic() + args.timeout
    stuck: list[str] | None = None
    all_ids = pending = ids
    while time.monotonic() < deadline:
        try:
            all_ids = ids + [str(i) for i in client.zrange(key_jobs_key(sync_record.id), 0, -1)]
            statuses = store.statuses(all_ids)
        except redis.RedisError:
            time.sleep(1)
            continue
        pending = [i for i, s in zip(all_ids, statuses, strict=True) if s is None or not s.terminal]
        syncing = not all(future.done() for future in sync_futures) or any(
            t.is_alive() for t in extra
        )
        if stuck is None and time.monotonic() > harness.last_fault_end + args.stuck_after:
            stuck = pending
            if stuck:
                say(
                    f"{len(stuck)} jobs not ended {args.stuck_after:.0f}s after the last fault: {stuck[:5]}"
                )
        if not pending and not syncing:
            break
        if int(time.monotonic() - T0) % 10 == 0:
            say(f"{len(pending)} jobs not finished yet")
        time.sleep(1)
    stuck = stuck or []
    say("every job ended" if not pending else f"{len(pending)} jobs never ended: {pending[:5]}")
    done.set()
    waits.shutdown(wait=False, cancel_futures=True)
    time.sleep(3)  # the last webhooks
    jobs = store.get_many(ids)
    sync_jobs = store.get_many(all_ids[len(ids) :])
    everything = jobs + sync_jobs
    lost = sum(1 for job in everything if job is None or not job.status.terminal)
    succeeded = [job for job in everything if job is not None and job.status is JobStatus.SUCCEEDED]
    failed = [job for job in everything if job is not None and job.status is JobStatus.FAILED]
    duplicates = sum(max(0, job.attempts - 1) for job in everything if job is not None)
    # Charges: one job per Idempotency-Key, and credits match what the jobs cost.
    duplicate_charges = unpaid = 0
    for key_id, expected, owned in (
        (record.id, len(ids), jobs),
        (sync_record.id, args.sync, sync_jobs),
    ):
        spent = start_credits[key_id] - keys.credits(key_id)
        owed = sum(job.cost for job in owned if job is not None and not job.refunded)
        duplicate_charges += max(0, client.zcard(key_jobs_key(key_id)) - expected) + max(
            0, spent - owed
        )
        unpaid += max(0, owed - spent)  # credits back that no job's refund accounts for
    ended_badly = (JobStatus.FAILED, JobStatus.CANCELED)
    unpaid += sum(
        1 for job in everything if job is not None and (job.status in ended_badly) != job.refunded
    )
    storage = S3Storage(harness.settings)
    objects: dict[str, int] = {}
    for page in storage.client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket):
        for item in page.get("Contents", []):
            job_id = item["Key"].split("/")[1]
            objects[job_id] = objects.get(job_id, 0) + 1
    duplicate_objects = sum(count - 1 for count in objects.values() if count > 1)
    duplicate_objects += len(set(objects) - {job.id for job in succeeded})
    webhook_ids = {
        r.headers["webhook-id"]
        for r in receiver.at("/chaos")
        if json.loads(r.body)["type"] == "job.succeeded"
    }
    hooked = sum(1 for job in jobs if job is not None and job.status is JobStatus.SUCCEEDED)
    if failed:
        say(f"{len(failed)} failed (refunded): {sorted({job.error for job in failed})}")
    counts = [
        f"{len(ids)} submitted",
        f"{len(harness.faults)} faults",
        f"{lost} lost",
        f"{len(stuck)} stuck",
        f"{duplicates} duplicate executions",
        f"{duplicate_charges} duplicate charges",
        f"{duplicate_objects} duplicate objects",
        f"{unpaid} unpaid refunds",
        f"{len(webhook_ids)} unique succeeded webhook ids",
    ]
    causes = duplicate_causes(store, everything, harness.faults)
    if causes:
        say(
            "duplicate executions by cause: "
            + ", ".join(f"{n} after {c}" for c, n in causes.most_common())
        )
    for kind, seconds in takeover_waits(store, harness.takeovers).items():
        say(
            f"takeover after {kind} (lease {args.lease:g}s): {len(seconds)} jobs, waited "
            f"median {statistics.median(seconds):.1f}s, max {max(seconds):.1f}s to start again"
        )
    sync = harness.sync
    if args.sync:
        say(
            f"sync waits: {args.sync} sent, {sync.answered} answered with the image "
            f"({sync.retried} after a retry){'; ' + '; '.join(sync.errors[:3]) if sync.errors else ''}"
        )
    reconciled = Counter(re.findall(r"reconciler: (\w+) (\d+) job", harness.log_tail("api", 10**8)))
    if reconciled:
        totals = Counter[str]()
        for (action, count), n in reconciled.items():
            totals[action] += int(count) * n
        say("reconciler: " + ", ".join(f"{action} {n}" for action, n in totals.items()))
    print(", ".join(counts), flush=True)
    ok = lost == 0 and not stuck and duplicate_charges == 0 and duplicate_objects == 0
    ok = ok and unpaid == 0 and len(webhook_ids) == hooked and not failed
    ok = ok and sync.answered == args.sync
    if args.canary and duplicates == 0:
        say("canary: no duplicate execution seen; the harness cannot see duplicates")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
