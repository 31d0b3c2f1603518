"""bench/gpu_sdxl.py: refuses clearly without CUDA; its code runs (on a tiny model)."""

from __future__ import annotations

import json
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


def test_cpu_smoke_prints_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "bench/gpu_sdxl.py", "--cpu-smoke", "--no-compile", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert [v["variant"] for v in figures["variants"]] == ["fp16 + SDPA", "+ channels_last"]
    assert set(figures["images_per_s"]) == {"1", "2", "4"}
    assert figures["process_start_to_first_image_s"] > 0
    assert "| fp16 + SDPA |" in result.stdout
