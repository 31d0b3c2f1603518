"""The short chaos run: 30 jobs and 4 faults, on servers of its own, under sdq's default
visibility timeout (the leases do the work)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(420)
def test_short_chaos_loses_nothing() -> None:
    argv = [
        sys.executable, "bench/chaos.py", "--jobs", "30", "--child-kills", "1",
        "--main-kills", "1", "--valkey-restarts", "1", "--s3-stops", "0",
        "--valkey-outages", "0", "--api-kills", "1", "--burst-kills", "0", "--sync", "5",
        "--batches", "1", "--seed", "7",
    ]  # fmt: skip
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=400)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.fullmatch(
        r"30 submitted, 4 faults, 0 lost, 0 stuck, (\d+) duplicate executions, "
        r"0 duplicate charges, 0 duplicate objects, 0 unpaid refunds, "
        r"30 unique succeeded webhook ids",
        summary,
    )
    assert match, summary
    assert result.stdout.count("FAULT ") == 4
