"""``sdq batch``: a JSONL file rendered, killed midway, resumed without paying twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from common.keys import KeyStore

SDQ = [sys.executable, "-m", "producer.cli"]


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


def test_batch_refuses_a_bad_file_before_submitting(
    env: dict[str, str], api_url: str, new_key, keys: KeyStore, tmp_path: Path
) -> None:
    key = new_key(10)
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "x", "steps": 0}\n')
    cli_env = {**env, "SDQ_API_URL": api_url, "SDQ_API_KEY": key}
    result = subprocess.run(
        [*SDQ, "batch", str(prompts), "--out", str(tmp_path / "o")],
        env=cli_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "bad.jsonl:2" in result.stderr
    assert keys.authenticate(key).credits == 10
