"""A bounded load test: POST /v1/jobs at a fixed rate against the API on loopback.

Open loop: a request is started every 1/rate seconds whatever the earlier ones are doing,
for ``--duration`` seconds (at most rate x duration requests). The jobs go to a tier that no
worker serves here, so generation does not compete with the API for the two cores. Prints
the error rate, submit latency p50/p99, the rate achieved, and how many accepted jobs are
missing from the store or the broker's queue (lost).

    python bench/load.py [--rate 200] [--duration 60] [--api-workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.chaos import Harness, plain_options  # noqa: E402
from common.apikeys import KeyStore  # noqa: E402
from common.redis import connect  # noqa: E402
from common.store import JobStore  # noqa: E402
from common.transport import PRIORITY_STEPS, queue_key  # noqa: E402


async def fire(
    args: argparse.Namespace, url: str, key: str
) -> tuple[list[float], list[int], list[str], float]:
    latencies: list[float] = []
    statuses: list[int] = []
    ids: list[str] = []
    body = {"prompt": "load", "tier": "premium", "steps": 1}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": key}, limits=limits, timeout=30
    ) as client:

        async def one() -> None:
            began = time.perf_counter()
            try:
                response = await client.post("/v1/jobs", json=body)
                statuses.append(response.status_code)
                if response.status_code == 202:
                    ids.append(response.json()["id"])
            except httpx.HTTPError:
                statuses.append(0)
            latencies.append(time.perf_counter() - began)

        total = int(args.rate * args.duration)
        started = time.perf_counter()
        tasks = []
        for index in range(total):
            delay = started + index / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return latencies, statuses, ids, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--api-workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdq-load-") as tmp:
        harness = Harness(plain_options(0, args.api_workers), Path(tmp), None)
        try:
            harness.start()
            client = connect(harness.redis_url)
            # One tenant at the whole rate, its jobs parked: no per-key rate or cap of jobs.
            key, _ = KeyStore(client).create(10**9, "load", rate=100_000, max_jobs=1_000_000)
            latencies, statuses, ids, elapsed = asyncio.run(fire(args, harness.api_url, key))
            store = JobStore(client)
            present = sum(1 for status in store.statuses(ids) if status is not None)
            queued = sum(int(client.llen(queue_key("sdq.premium", p))) for p in PRIORITY_STEPS)
        finally:
            harness.stop()
    errors = sum(1 for s in statuses if s != 202)
    ordered = sorted(latencies)
    print(
        f"{len(statuses)} requests in {elapsed:.1f} s ({len(statuses) / elapsed:.0f}/s, target {args.rate:.0f}/s), "
        f"{args.api_workers} API processes"
    )
    print(f"errors: {errors} ({100 * errors / max(1, len(statuses)):.2f}%)")
    print(
        f"submit latency: p50 {statistics.median(ordered) * 1000:.1f} ms, p99 {ordered[int(0.99 * (len(ordered) - 1))] * 1000:.1f} ms"
    )
    lost = (len(ids) - present) + (len(ids) - queued)
    print(f"accepted {len(ids)}, in the store {present}, in the broker queue {queued}: {lost} lost")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
