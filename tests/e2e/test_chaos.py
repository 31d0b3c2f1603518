"""The short chaos run: about 30 jobs and 3 faults, on servers of its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_short_chaos_loses_nothing() -> None:
    argv = [
        sys.executable, "bench/chaos.py", "--jobs", "30", "--child-kills", "1",
        "--main-kills", "1", "--valkey-restarts", "1", "--s3-stops", "0", "--seed", "7",
    ]  # fmt: skip
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=400)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.fullmatch(
        r"30 submitted, 3 faults, 0 lost, (\d+) duplicate executions, 0 duplicate charges, "
        r"0 duplicate objects, 30 unique succeeded webhook ids",
        summary,
    )
    assert match, summary
    assert result.stdout.count("FAULT ") == 3
