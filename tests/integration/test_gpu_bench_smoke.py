"""bench/gpu_sdxl.py --cpu-smoke (issue 18): every block runs on the tiny model, the JSON
names each variant with its stages, TFLOP/s and progress lag, the compiled block warms one
graph and recompiles none, and the batch block reports each batch's gain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_smoke_runs_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "bench/gpu_sdxl.py", "--cpu-smoke", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(out.read_text())
    rows = {row["variant"]: row for row in figures["variants"]}
    assert list(rows) == ["diffusers fp16 SDPA", "sdq fp16", "sdq bf16", "sdq bf16 compile"]
    assert figures["skipped"] == []
    for row in rows.values():
        assert row["p50_s"] > 0 and row["tflop_per_s"] > 0
        assert set(row["stages_s"]) == {
            "text_s", "denoise_s", "decode_s", "postprocess_s", "encode_png_s", "pipeline_s"
        }  # fmt: skip
    for name in ("sdq fp16", "sdq bf16", "sdq bf16 compile"):
        assert 0 <= rows[name]["progress_lag_steps"] <= 2
    compiled = rows["sdq bf16 compile"]
    assert compiled["graphs_warmed"] == 1 and compiled["recompiles"] == 0
    assert compiled["eager_calls"] == 0
    assert set(figures["batches"]["images_per_s"]) == {"1", "2", "4", "8"}
    assert figures["batches"]["gain_over_batch_1"]["1"] == 1.0
    assert isinstance(figures["batching_worth_it"], bool)
    assert "| sdq bf16 compile |" in result.stdout
