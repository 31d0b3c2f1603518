"""A worker's start-up refusals, as an operator reads them: the hardware first, naming what
to set, then any invalid setting, each one line with exit status 2 and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SDQ = [sys.executable, "-m", "producer.cli"]


def worker(tier: str, env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SDQ, "worker", "--tier", tier],
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if "sdq worker:" in line]


def test_production_with_the_dev_secret_still_refuses_the_hardware_first(
    env: dict[str, str],
) -> None:
    result = worker("premium", env, SDQ_ENV="production", SDQ_S3_SECRET_KEY="sdq-dev-secret")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "pydantic" not in result.stderr
    [line] = lines(result)
    assert "tier 'premium' needs one of: a100, h100, h200; this machine has cpu" in line
    assert "SDQ_HARDWARE_OVERRIDE=true" in line


def test_then_the_invalid_setting_in_one_line(env: dict[str, str]) -> None:
    result = worker(
        "premium",
        env,
        SDQ_ENV="production",
        SDQ_S3_SECRET_KEY="sdq-dev-secret",
        SDQ_HARDWARE_OVERRIDE="true",
        # What else production refuses (tests/unit/test_production_settings.py), made real.
        SDQ_WEBHOOK_ALLOW_LOOPBACK="0",
        SDQ_METRICS_TOKEN="0d9c8b7a6f5e4d3c2b1a",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = lines(result)
    assert line.endswith(
        "invalid settings: SDQ_S3_SECRET_KEY is the development placeholder; "
        "set a real secret in production"
    )


def test_a_tier_that_would_go_remote_says_how_to_opt_in(
    env: dict[str, str], tmp_path: Path
) -> None:
    """budget lists `no_device` as a fallback; without the opt-in its worker refuses instead
    of sending prompts to a third party."""
    result = worker("budget", env, SDQ_ENV="production", SDQ_REMOTE_API_KEY="hp-key")
    assert result.returncode == 2
    [line] = lines(result)
    assert "tier 'budget' needs one of: t4" in line
    assert "SDQ_REMOTE_FALLBACK=true and SDQ_REMOTE_API_KEY" in line
