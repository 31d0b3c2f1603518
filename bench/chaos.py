"""Chaos: submit jobs while killing workers, restarting Valkey and stopping S3, then count.

Everything runs on loopback: its own Valkey (AOF on), its own SeaweedFS, the API, worker
processes (prefork, one child, each with its share of the cores) and a webhook receiver.
Faults are spread over the run and logged with their time. The last line reads

    300 submitted, 39 faults, 0 lost, D duplicate executions, 0 duplicate charges,
    0 duplicate objects, 300 unique succeeded webhook ids

and the exit status is non-zero if anything was lost, charged or stored twice. ``--canary``
adds a job that runs longer than the visibility timeout, so Redis hands it to a second
worker while the first still runs it: D must then be above 0, which proves the harness sees
duplicates.

    python bench/chaos.py                 # the full run (make chaos)
    python bench/chaos.py --jobs 30 --child-kills 1 --main-kills 1 --valkey-restarts 1 --s3-stops 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.localstack import SDQ, T0, LocalStack, children, say  # noqa: E402
from common.job import Job  # noqa: E402
from common.keys import KeyStore  # noqa: E402
from common.storage import S3Storage  # noqa: E402
from common.store import JobStore, key_jobs_key  # noqa: E402
from tests.conftest import wait_until  # noqa: E402
from tests.receiver import Receiver  # noqa: E402


@dataclass
class Fault:
    at: float  # time.time()
    kind: str
    message: str


def duplicate_causes(store: JobStore, jobs: list[Job | None], faults: list[Fault]) -> Counter[str]:
    """Each re-run of a job, put down to the first fault between its previous start and this
    one (the one that cut the run short; the re-run waits for the visibility timeout, so
    later faults may fall in between too): at-least-once promises a re-run only after a kill, a restart or an outage (or, in
    the canary, a job that outlives the visibility timeout)."""
    causes: Counter[str] = Counter()
    for job in jobs:
        if job is None or job.attempts < 2:
            continue
        starts = [
            datetime.fromisoformat(event["timestamp"]).timestamp()
            for event in store.events(job.id)
            if event["type"] == "job.started"
        ]
        for previous, again in itertools.pairwise(starts):
            between = [fault for fault in faults if previous <= fault.at <= again]
            causes[between[0].kind if between else "no fault (the visibility timeout)"] += 1
            if not between:
                say(
                    f"job {job.id} started again {again - previous:.1f}s later with no fault between"
                )
    return causes


class Harness(LocalStack):
    def __init__(self, args: argparse.Namespace, home: Path) -> None:
        extra = {
            "SDQ_VISIBILITY_TIMEOUT_SECONDS": str(args.visibility_timeout),
            "SDQ_MAX_DELIVERIES": "6",
            "SDQ_WEBHOOK_RETRY_BASE_SECONDS": "0.5",
            "SDQ_WEBHOOK_RETRY_MAX_SECONDS": "5",
        }
        if args.workers > 1:
            # Each worker's torch would start one thread per core: two workers on two cores
            # then run four spinning threads on two, and a job of 0.3 s took 1-3 s, some 17 s
            # (past the visibility timeout, so Redis handed them out again). One worker's
            # share of the cores each, as a machine with a device per worker would have.
            share = max(1, (os.cpu_count() or 1) // args.workers)
            extra["OMP_NUM_THREADS"] = str(share)
        super().__init__(home, "chaos", extra)
        self.args = args
        self.faults: list[Fault] = []

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

    # --- faults ----------------------------------------------------------------------
    def fault(self, kind: str, message: str) -> None:
        self.faults.append(Fault(time.time(), kind, message))
        say(f"FAULT {len(self.faults)}: {message}")

    def pool_children(self, name: str) -> list[int]:
        return children(self.procs[name].pid)

    def kill_child(self) -> None:
        name = random.choice([n for n in self.procs if n.startswith("worker")])
        children = self.pool_children(name)
        if not children:
            self.fault("no child", f"{name} had no pool child to kill (restarting)")
            return
        pid = random.choice(children)
        os.kill(pid, signal.SIGKILL)
        self.fault("pool child kill", f"SIGKILL pool child {pid} of {name}")

    def kill_main(self) -> None:
        name = random.choice([n for n in self.procs if n.startswith("worker")])
        self.kill(name, signal.SIGKILL)
        self.fault("worker kill -9", f"kill -9 of {name}'s main process and its pool; restarted")
        self.start_worker(int(name.removeprefix("worker")))

    def restart_valkey(self) -> None:
        self.kill("valkey", signal.SIGTERM)
        self.fault("Valkey restart", "Valkey stopped (SIGTERM, AOF flushed) and restarted")
        self.start_valkey()

    def stop_s3(self) -> None:
        pid = self.procs["weed"].pid
        os.killpg(pid, signal.SIGSTOP)
        self.fault("S3 stop", "S3 server stopped (SIGSTOP) for 5 s")
        time.sleep(5)
        os.killpg(pid, signal.SIGCONT)

    def run_faults(self, span: float, done: threading.Event) -> None:
        a = self.args
        plan = (
            [self.kill_child] * a.child_kills + [self.kill_main] * a.main_kills
            + [self.restart_valkey] * a.valkey_restarts + [self.stop_s3] * a.s3_stops
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


def submit(api_url: str, key: str, index: int, body: dict[str, Any]) -> str:
    """POST /v1/jobs until it is accepted; the Idempotency-Key makes the retries safe."""
    deadline = time.monotonic() + 180
    while True:
        try:
            response = httpx.post(
                f"{api_url}/v1/jobs",
                json=body,
                headers={"Authorization": key, "Idempotency-Key": f"chaos-{index}"},
                timeout=60,
            )
            if response.status_code == 202:
                return str(response.json()["id"])
            error = f"{response.status_code} {response.text[:120]}"
        except httpx.HTTPError as exc:
            error = str(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {index} never accepted: {error}")
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--child-kills", type=int, default=30)
    parser.add_argument("--main-kills", type=int, default=5)
    parser.add_argument("--valkey-restarts", type=int, default=3)
    parser.add_argument("--s3-stops", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--visibility-timeout", type=int, default=15)
    parser.add_argument(
        "--canary", action="store_true", help="Add a job longer than the visibility timeout."
    )
    parser.add_argument("--timeout", type=float, default=840)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", help="Keep the servers' data and logs in this directory.")
    args = parser.parse_args()
    random.seed(args.seed)

    with tempfile.TemporaryDirectory(prefix="sdq-chaos-") as tmp:
        home = Path(args.keep) if args.keep else Path(tmp)
        harness = Harness(args, home)
        receiver = Receiver()
        try:
            harness.start()
            say("stack up")
            return run(harness, receiver, args)
        finally:
            harness.stop()
            receiver.close()


def run(harness: Harness, receiver: Receiver, args: argparse.Namespace) -> int:
    client = redis.Redis.from_url(harness.redis_url, decode_responses=True)
    keys = KeyStore(client)
    key, record = keys.create(100_000)
    start_credits = record.credits
    hook = receiver.url + "/chaos"
    bodies = [
        {"prompt": f"chaos {i}", "tier": "budget", "steps": args.steps, "seed": i,
         "webhook_url": hook, "webhook_events": ["job.succeeded"]}
        for i in range(args.jobs)
    ]  # fmt: skip
    if args.canary:
        # Longer than the visibility timeout: Redis redelivers it to the other worker.
        canary = {"prompt": "canary", "tier": "normal", "steps": 12, "width": 256, "height": 256}
        bodies.append({**canary, "webhook_url": hook, "webhook_events": ["job.succeeded"]})
    done = threading.Event()
    # Spread the faults over about the time the jobs take, so that they land on busy
    # workers: two workers of one torch thread each, about 0.5 s a job, plus the restarts.
    span = args.jobs * 0.25
    faults = threading.Thread(target=harness.run_faults, args=(span, done), daemon=True)
    faults.start()
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda item: submit(harness.api_url, key, *item), enumerate(bodies)))
    say(f"{len(ids)} jobs accepted")
    store = JobStore(client)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            statuses = store.statuses(ids)
        except redis.RedisError:
            time.sleep(1)
            continue
        pending = sum(1 for s in statuses if s is None or not s.terminal)
        if pending == 0 and not faults.is_alive():
            break
        if int(time.monotonic() - T0) % 10 == 0:
            say(f"{pending} jobs not finished yet")
        time.sleep(1)
    say("every job ended")
    done.set()
    faults.join()
    time.sleep(3)  # the last webhooks
    jobs = store.get_many(ids)
    lost = sum(1 for job in jobs if job is None or not job.status.terminal)
    succeeded = [job for job in jobs if job is not None and job.status.value == "succeeded"]
    failed = [job for job in jobs if job is not None and job.status.value == "failed"]
    duplicates = sum(max(0, job.attempts - 1) for job in jobs if job is not None)
    # Charges: one job per Idempotency-Key, and credits match what the jobs cost.
    indexed = client.zcard(key_jobs_key(record.id))
    spent = start_credits - keys.credits(record.id)
    owed = sum(job.cost for job in jobs if job is not None and not job.refunded)
    duplicate_charges = (indexed - len(ids)) + max(0, spent - owed)
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
    if failed:
        say(f"{len(failed)} failed (refunded): {sorted({job.error for job in failed})}")
    counts = [
        f"{len(ids)} submitted",
        f"{len(harness.faults)} faults",
        f"{lost} lost",
        f"{duplicates} duplicate executions",
        f"{duplicate_charges} duplicate charges",
        f"{duplicate_objects} duplicate objects",
        f"{len(webhook_ids)} unique succeeded webhook ids",
    ]
    causes = duplicate_causes(store, jobs, harness.faults)
    if causes:
        say(
            "duplicate executions by cause: "
            + ", ".join(f"{n} after {c}" for c, n in causes.most_common())
        )
    print(", ".join(counts), flush=True)
    ok = lost == 0 and duplicate_charges == 0 and duplicate_objects == 0
    ok = ok and len(webhook_ids) == len(succeeded) and not failed
    if args.canary and duplicates == 0:
        say("canary: no duplicate execution seen; the harness cannot see duplicates")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
