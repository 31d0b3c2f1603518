"""bench/fleet.py at its smallest: two sleeping workers, 20 jobs, every figure written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FIGURES = [
    "sustained_jobs_per_second", "ideal_jobs_per_second", "ratio",
    "valkey_cpu_seconds_per_1000_jobs", "valkey_bytes_per_job", "valkey_bytes_per_job_record",
    "submit_p50_ms", "submit_p99_ms", "list_jobs_p99_ms", "webhook_deliveries_per_second",
    "cpu_percent_of_one_core", "worker_pss_mib_each",
]  # fmt: skip


@pytest.mark.timeout(90)
def test_fleet_smoke_every_job_and_figure(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    argv = [
        sys.executable, "bench/fleet.py", "--workers", "2", "--jobs", "20",
        "--seconds-per-image", "0.2", "--history", "500", "--idle-seconds", "1",
        "--json", str(out),
    ]  # fmt: skip
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    (phase,) = figures["phases"]
    assert phase["succeeded"] == 20 and phase["submit_errors"] == 0
    for name in FIGURES:
        assert phase[name] is not None, name
    assert phase["webhook_deliveries"] == phase["webhook_deliveries_expected"]
    assert figures["workers_importing_torch"] == []
    assert "history_seeding" in figures
