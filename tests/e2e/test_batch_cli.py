"""``sdq batch``: a JSONL file checked whole, rendered, stopped midway (Ctrl-C or a kill),
resumed without paying twice; failed lines retried on the next run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from PIL import Image

from common.apikeys import KeyStore
from common.redis_keys import apikey_key
from producer.client import Client

SDQ = [sys.executable, "-m", "producer.cli"]


def write_jsonl(path: Path, jobs: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def credits(api_url: str, key: str) -> int:
    with Client(api_url, key) as client:
        return client.account().credits


def jobs_of(api_url: str, key: str) -> list[str]:
    with Client(api_url, key) as client:
        return [job.id for job in client.jobs(limit=100).jobs]


def batch(
    argv: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SDQ, "batch", *argv], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_batch_resumes_after_a_kill(
    env: dict[str, str], api_url: str, new_key, keys: KeyStore, tmp_path: Path
) -> None:
    key = new_key(100)
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"prompt": f"tile {i}", "tier": "budget", "steps": 8, "seed": i})
        for i in range(12)
    ]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    cli_env = {**env, "SDQ_API_URL": api_url, "SDQ_API_KEY": key}
    argv = [*SDQ, "batch", str(prompts), "--out", str(out), "--concurrency", "2"]
    first = subprocess.Popen(
        argv, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    results = out / "results.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if results.exists() and len(results.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = len(results.read_text().splitlines())
    assert 3 <= done_before < 12

    second = subprocess.run(argv, env=cli_env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert f"{done_before} of 12 done already" in second.stderr
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["line"] for r in records) == list(range(1, 13))
    assert all(r["status"] == "succeeded" for r in records)
    for number in range(1, 13):
        with Image.open(out / f"{number:05d}.jpg") as image:
            assert image.format == "JPEG"
    # 12 jobs at 1 credit: the jobs in flight at the kill were returned, not bought again.
    assert keys.authenticate(key).credits == 100 - 12


def test_batch_stops_at_the_first_ctrl_c_and_resumes(
    env: dict[str, str], api_url: str, new_key, tmp_path: Path
) -> None:
    key = new_key(100)
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": f"tile {i}", "tier": "budget", "steps": 8, "seed": i} for i in range(12)],
    )
    out = tmp_path / "out"
    cli_env = {**env, "SDQ_API_URL": api_url, "SDQ_API_KEY": key}
    argv = [str(prompts), "--out", str(out), "--concurrency", "2"]
    first = subprocess.Popen(
        [*SDQ, "batch", *argv], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    results = out / "results.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and first.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)  # once
    sent = time.monotonic()
    _, stderr = first.communicate(timeout=30)
    assert first.returncode == 130, stderr
    assert time.monotonic() - sent < 5, "the first Ctrl-C should stop it at once"
    assert "Traceback" not in stderr and "interrupted: " in stderr
    done = len(results.read_text().splitlines())
    submitted = len(jobs_of(api_url, key))
    assert done <= submitted < 12, "it went on submitting after Ctrl-C"
    assert 100 - credits(api_url, key) == submitted

    second = batch(argv, cli_env)
    assert second.returncode == 0, second.stderr
    assert f"{done} of 12 done already; rendering {12 - done}" in second.stderr
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["line"] for r in records) == list(range(1, 13))
    assert all(r["status"] == "succeeded" for r in records)
    # The lines in flight at Ctrl-C got their jobs back: 12 jobs, 12 credits, none twice.
    assert len(jobs_of(api_url, key)) == 12
    assert credits(api_url, key) == 100 - 12


def test_batch_retries_failed_lines_on_the_next_run(
    env: dict[str, str], api_url: str, new_key, keys: KeyStore, rclient: redis.Redis,
    tmp_path: Path,
) -> None:  # fmt: skip
    key = new_key(1)  # enough for the first line only
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": f"tile {i}", "tier": "budget", "steps": 2, "seed": i} for i in range(2)],
    )
    out = tmp_path / "out"
    cli_env = {**env, "SDQ_API_URL": api_url, "SDQ_API_KEY": key}
    argv = [str(prompts), "--out", str(out), "--concurrency", "1"]

    first = batch(argv, cli_env)
    assert first.returncode == 1, first.stderr
    assert "line 2: error: 429:" in first.stderr
    assert "1 succeeded, 1 failed, 0 canceled of 2 lines" in first.stderr
    assert str(out / "results.jsonl") in first.stderr
    assert credits(api_url, key) == 0

    skipped = batch([*argv, "--no-retry"], cli_env)
    assert skipped.returncode == 1, skipped.stderr
    assert "1 of 2 done already; rendering 0 (skipping 1 that did not succeed" in skipped.stderr
    assert len(jobs_of(api_url, key)) == 1

    rclient.hincrby(apikey_key(keys.find(key).id), "credits", 1)  # the operator tops it up
    second = batch([*argv, "--json"], cli_env)
    assert second.returncode == 0, second.stderr
    assert "1 of 2 done already; rendering 1 (1 that did not succeed before)" in second.stderr
    summary = json.loads(second.stdout)
    assert summary["succeeded"] == 2 and summary["failed"] == 0 and summary["pending"] == 0
    assert summary["results"] == str(out / "results.jsonl")
    assert (out / "00002.jpg").is_file()
    assert credits(api_url, key) == 0 and len(jobs_of(api_url, key)) == 2


def test_batch_makes_a_new_job_for_a_canceled_line(
    env: dict[str, str], api_url: str, new_key, tmp_path: Path
) -> None:
    key = new_key(10)
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "slow", "tier": "budget", "steps": 30, "width": 128, "height": 128}],
    )
    out = tmp_path / "out"
    cli_env = {**env, "SDQ_API_URL": api_url, "SDQ_API_KEY": key}
    argv = [str(prompts), "--out", str(out)]
    first = subprocess.Popen(
        [*SDQ, "batch", *argv], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (ids := jobs_of(api_url, key)) and time.monotonic() < deadline:
        time.sleep(0.05)
    with Client(api_url, key) as client:
        client.cancel(ids[0])
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 1, stderr
    assert "0 succeeded, 0 failed, 1 canceled of 1 lines" in stderr
    assert credits(api_url, key) == 10  # refunded

    # The canceled job stays canceled under its Idempotency-Key: the retry needs a new job.
    second = batch(argv, cli_env)
    assert second.returncode == 0, second.stderr
    assert len(jobs_of(api_url, key)) == 2 and credits(api_url, key) == 9


def test_batch_refuses_a_bad_file_before_submitting(
    env: dict[str, str], api_url: str, new_key, tmp_path: Path
) -> None:
    key = new_key(10)
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(
        '{"prompt": "fine", "tier": "budget"}\n'
        '{"prompt": "many steps", "steps": 100, "tier": "budget"}\n'
        '{"prompt": "gold", "tier": "ultra"}\n'
        "\n"
        '{"prompt": "x", "steps": 0}\n'
        "not json\n"
    )
    cli_env = {**env, "SDQ_API_URL": api_url, "SDQ_API_KEY": key}
    with Client(api_url, key) as client:
        names = ", ".join(tier.name for tier in client.tiers())
    result = batch([str(prompts), "--out", str(tmp_path / "o")], cli_env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "line 2: steps must be at most 30 on tier budget",
        f"line 3: unknown tier 'ultra'; choose one of: {names}",
        "line 5: steps: Input should be greater than or equal to 1",
        "line 6: not JSON (Expecting value)",
        "error: bad.jsonl: 4 bad lines; nothing was submitted",
    ]
    assert credits(api_url, key) == 10 and jobs_of(api_url, key) == []


def test_batch_stops_when_its_key_is_revoked(
    env: dict[str, str], api_url: str, new_key, keys: KeyStore, tmp_path: Path
) -> None:
    key = new_key(100)
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": f"tile {i}", "tier": "budget", "steps": 8, "seed": i} for i in range(12)],
    )
    out = tmp_path / "out"
    cli_env = {**env, "SDQ_API_URL": api_url, "SDQ_API_KEY": key}
    argv = [*SDQ, "batch", str(prompts), "--out", str(out), "--concurrency", "2"]
    run = subprocess.Popen(
        argv, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out / "results.jsonl").exists():
        time.sleep(0.05)
    keys.revoke(key)
    _, stderr = run.communicate(timeout=30)
    assert run.returncode == 1, stderr
    assert "Traceback" not in stderr
    last, error = stderr.splitlines()[-2:]
    assert "succeeded" in last and "left" in last
    assert error == "error: 403: this API key was revoked (check --key or SDQ_API_KEY)"
