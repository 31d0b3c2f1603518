"""Two tiers busy at once on the CPU: one image alone, then one image on each of two tiers.

It starts ``sdq up --detach`` on a home and loopback ports of its own (the tiny model that
``sdq up`` builds), submits through ``POST /v1/jobs`` and follows each job's event stream, then
stops the stack. It prints, for each case, the median and the spread (min-max) of the
worker's time per image (``finished_at - started_at``) and of the wall time from submit to
success (the figures are in docs/benchmarks.md).

By default each CPU worker gets the thread share ``sdq up`` gives it; ``--threads N`` sets
SDQ_TORCH_THREADS, OMP_NUM_THREADS and MKL_NUM_THREADS to N for every worker, as an
operator would (``--threads $(nproc)`` is torch's own default, one thread per core).

    python bench/cpu_share.py [--runs 7] [--steps 20] [--tiers budget,normal] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from producer.servers import free_port  # noqa: E402

SDQ = [sys.executable, "-m", "producer.cli"]


def run_one(client: httpx.Client, tier: str, steps: int, seed: int) -> tuple[float, float]:
    """Submit one 64x64 image on ``tier`` and wait for it: (worker seconds, wall seconds)."""
    sent = time.monotonic()
    body = {"prompt": "a red kite", "tier": tier, "steps": steps, "seed": seed}
    job_id = client.post("/v1/jobs", json=body).raise_for_status().json()["id"]
    # The event stream ends with the job's terminal event: no polling against the key's rate.
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        for _ in events.iter_lines():
            pass
    wall = time.monotonic() - sent
    job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} on {tier}: {job['status']} {job.get('error')}")
    return job["finished_at"] - job["started_at"], wall


def summary(label: str, runs: list[tuple[float, float]]) -> str:
    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"

    run = spread([r for r, _ in runs])
    wall = spread([w for _, w in runs])
    return f"{label:<24} run {run}  wall {wall}  {len(runs)} images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tiers", default="budget,normal")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    tiers = args.tiers.split(",")

    home = Path(tempfile.mkdtemp(prefix="sdq-cpu-share-"))
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    env.update(
        SDQ_HOME=str(home),
        SDQ_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        SDQ_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        SDQ_API_PORT=str(api_port),
        SDQ_FLOWER_PORT=str(free_port()),
    )
    if args.threads is not None:
        for name in ("SDQ_TORCH_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(args.threads)
    up = subprocess.run(
        [*SDQ, "up", "--detach"], env=env, capture_output=True, text=True, timeout=600, cwd=home
    )
    try:
        if up.returncode != 0:
            raise SystemExit(f"sdq up failed:\n{up.stderr}")
        key = re.search(r"API key\s+(sdq_\S+)", up.stderr)
        assert key, up.stderr
        cores = len(os.sched_getaffinity(0))
        print(
            f"{cores} cores; threads per worker: "
            f"{args.threads if args.threads is not None else 'the share sdq up gives'}; "
            f"{args.steps} steps, 64x64, tiny SDXL",
            flush=True,
        )
        headers = {"Authorization": key.group(1)}
        with (
            httpx.Client(
                base_url=f"http://127.0.0.1:{api_port}", headers=headers, timeout=120
            ) as client,
            ThreadPoolExecutor(len(tiers)) as pool,
        ):
            for tier in tiers:  # warm-up: the first image of a process pays one-off costs
                run_one(client, tier, args.steps, 0)
            alone = [run_one(client, tiers[0], args.steps, i) for i in range(args.runs)]
            print(summary(f"alone     {tiers[0]}", alone), flush=True)
            together: list[tuple[float, float]] = []
            for i in range(args.runs):
                futures = [pool.submit(run_one, client, t, args.steps, i) for t in tiers]
                together += [f.result() for f in futures]
            print(summary(f"together  {'+'.join(tiers)}", together), flush=True)
    finally:
        subprocess.run([*SDQ, "down"], env=env, capture_output=True, timeout=120, cwd=home)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
