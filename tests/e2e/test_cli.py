"""The ``sdq`` command line as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from common.apikeys import KeyStore
from producer.client import Client

SDQ = [sys.executable, "-m", "producer.cli"]


def sdq(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SDQ, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_keys_create_prints_only_the_key(env: dict[str, str], keys: KeyStore) -> None:
    result = sdq("keys", "create", "--credits", "7", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdq_")
    assert keys.authenticate(lines[0]).credits == 7


def test_keys_create_refuses_negative_credits(env: dict[str, str]) -> None:
    result = sdq("keys", "create", "--credits", "-1", env=env)
    assert result.returncode == 2 and result.stdout == ""


def test_worker_refuses_a_tier_its_device_cannot_serve(env: dict[str, str]) -> None:
    production = {**env, "SDQ_ENV": "production"}
    result = sdq("worker", "--tier", "premium", env=production, timeout=60)
    assert result.returncode == 2
    assert "tier 'premium' needs one of: a100, h100, h200" in result.stderr
    assert "this machine has cpu" in result.stderr


def test_worker_refuses_an_unknown_tier(env: dict[str, str]) -> None:
    result = sdq("worker", "--tier", "gold", env=env, timeout=60)
    assert result.returncode == 2
    assert "unknown tier 'gold'" in result.stderr


def test_submit_waits_and_saves(env: dict[str, str], api_url: str, new_key, tmp_path: Path) -> None:
    out = tmp_path / "fox.png"
    cli_env = {**env, "SDQ_API_URL": api_url, "SDQ_API_KEY": new_key(10)}
    result = sdq(
        "submit", "a fox", "--tier", "budget", "--steps", "2", "--size", "64x96",
        "--seed", "3", "--format", "png", "-o", str(out), env=cli_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"status": "succeeded"' in result.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 96)
    job_id = json.loads(result.stdout)["id"]
    status = sdq("status", job_id, env=cli_env)
    assert status.returncode == 0, status.stderr
    assert f"id        {job_id}" in status.stdout and "status    succeeded" in status.stdout
    assert "render    2 steps, 64x96, seed 3, 1 image" in status.stdout
    as_json = sdq("status", job_id, "--json", env=cli_env)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["status"] == "succeeded"
    assert as_json.stdout.startswith('{\n  "id": ')  # the JSON `status` always printed


def test_jobs_lists_whole_ids(env: dict[str, str], api_url: str, new_key) -> None:
    cli_env = {**env, "SDQ_API_URL": api_url, "SDQ_API_KEY": new_key(10)}
    long_prompt = "a very long prompt about a lighthouse at dusk, " * 5
    submitted = [
        json.loads(
            sdq("submit", long_prompt, "--tier", "budget", "--steps", "1", env=cli_env).stdout
        )
        for _ in range(2)
    ]
    ids = {job["id"] for job in submitted}
    as_json = sdq("jobs", "--json", env=cli_env)
    assert as_json.returncode == 0, as_json.stderr
    assert {job["id"] for job in json.loads(as_json.stdout)["jobs"]} == ids
    # Piped, not a terminal: one tab-separated line a job, the id whole.
    plain = sdq("jobs", env=cli_env)
    assert plain.returncode == 0, plain.stderr
    header, *rows = plain.stdout.splitlines()
    assert header.split("\t") == ["id", "tier", "status", "created", "prompt"]
    assert {row.split("\t")[0] for row in rows} == ids
    assert all(row.split("\t")[4] == long_prompt.strip() for row in rows)


def test_submit_quotes_the_tiers_limits(env: dict[str, str], api_url: str, new_key) -> None:
    key = new_key(10)
    cli_env = {**env, "SDQ_API_URL": api_url, "SDQ_API_KEY": key}
    with Client(api_url, key) as client:
        names = ", ".join(tier.name for tier in client.tiers())
    cases = {
        ("--steps", "500", "--tier", "budget"): "steps must be at most 30 on tier budget",
        ("--size", "2048x2048", "--tier", "normal"): (
            "width must be at most 1536 on tier normal; height must be at most 1536 on tier normal"
        ),
        ("--images", "3", "--tier", "budget"): "num_images must be at most 2 on tier budget",
        ("--tier", "ultra",): f"unknown tier 'ultra'; choose one of: {names}",
        ("--steps", "0",): "steps: Input should be greater than or equal to 1",
    }  # fmt: skip
    for args, message in cases.items():
        result = sdq("submit", "a fox", *args, env=cli_env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == f"error: {message}"
    assert sdq("jobs", "--json", env=cli_env).stdout.count('"id"') == 0


def test_submit_reports_api_errors(env: dict[str, str], api_url: str) -> None:
    cli_env = {**env, "SDQ_API_URL": api_url, "SDQ_API_KEY": "sdq_wrong"}
    result = sdq("submit", "a fox", env=cli_env)
    assert result.returncode == 1
    assert "403: invalid API key" in result.stderr


def test_build_tiny(env: dict[str, str], tmp_path: Path) -> None:
    result = sdq("models", "build-tiny", str(tmp_path / "m"), env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "model_index.json").is_file()


def test_flower_refuses_a_public_address_without_auth(env: dict[str, str]) -> None:
    result = sdq("flower", "--host", "0.0.0.0", env=env, timeout=60)
    assert result.returncode == 2
    assert "set SDQ_FLOWER_BASIC_AUTH=user:password" in result.stderr


def test_submit_with_a_style_and_an_input_image(
    env: dict[str, str], api_url: str, new_key, tmp_path: Path
) -> None:
    """`--style` shows the prompt it produced; `--init-image` renders at the input's size."""
    source = tmp_path / "in.png"
    Image.new("RGB", (96, 72), (200, 40, 40)).save(source)
    out = tmp_path / "out.png"
    cli_env = {**env, "SDQ_API_URL": api_url, "SDQ_API_KEY": new_key(10)}
    result = sdq(
        "submit", "a castle", "--tier", "budget", "--steps", "4", "--style", "pixel-art",
        "--init-image", str(source), "--strength", "0.5", "--format", "png", "-o", str(out),
        env=cli_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["style"] == "pixel-art" and job["prompt"].startswith("pixel-art a castle, low-res")
    assert job["init_image_key"] and job["request"]["init_image"] is None
    with Image.open(out) as image:
        assert image.size == (96, 72)
