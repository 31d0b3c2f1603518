"""The benchmark scripts run: bench/gpu_sdxl.py refuses clearly without CUDA, and the CPU
bench finishes with figures on the smallest counts (its stack is the one `make load` and
`make chaos` start too)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_refuses_without_cuda() -> None:
    result = subprocess.run(
        [sys.executable, "bench/gpu_sdxl.py"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "needs" not in result.stdout
    assert "torch.cuda.is_available() is False" in result.stderr


def test_the_cpu_bench_runs_and_writes_its_figures(tmp_path: Path) -> None:
    """`make bench` with the smallest counts: it starts its stack, measures every part and
    writes figures that are rates and ratios, not errors."""
    out = tmp_path / "results.json"
    # More submits than a key's default cap of jobs (1000), at more than its default rate.
    argv = [sys.executable, "bench/bench.py", "--samples", "3", "--submits", "1500"]
    argv += ["--images", "12", "--api-workers", "1", "--out", str(out)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["throughput"]["sdq_images_per_s"] > 0
    # Two images a round are too few for the ratio to mean anything, and the other passes of
    # `make test` share the cores: it has to be a rate, not a verdict.
    assert 0 < figures["throughput"]["ratio"] < math.inf
    assert figures["submit_rate"]["sdq_per_s"] > 0
    assert figures["queue_overhead"]["sdq_p99_s"] > 0
    assert "| measure | sdq | baseline | ratio | goal |" in result.stdout
