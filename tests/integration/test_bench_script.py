"""bench/gpu_sdxl.py: refuses clearly without CUDA; its code runs (on a tiny model)."""

from __future__ import annotations

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
