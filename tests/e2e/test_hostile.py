"""The short hostile run: every attack of bench/hostile.py, smaller, on servers of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(200)
def test_no_tenant_hurts_the_service() -> None:
    argv = [sys.executable, "bench/hostile.py", "--short"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=170)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert " 0 failed, 0 outages, 0 charged refusals," in summary, summary
