"""`cp .env.example .env` (the docker compose step) in the folder `make up` runs from: `sdq up`
names the one setting that stops it and the .env line it came from, starts nothing, and comes
up once that line says what it asks for; `sdq ps` and `sdq down` work whatever the .env says."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_stack import SDQ, stack_env
from tests.support import ROOT


def line_of(path: Path, prefix: str) -> int:
    return next(
        n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(prefix)
    )


@pytest.mark.timeout(300)
def test_the_compose_env_file_is_named_then_works_once_fixed(tmp_path: Path) -> None:
    project = tmp_path / "checkout"
    project.mkdir()
    env_file = project / ".env"
    env_file.write_text((ROOT / ".env.example").read_text())
    # Free ports over the .env's, as a second stack on one machine needs; no SDQ_HOME: the
    # .env's `.sdq` is used. No GPU, whatever this machine has: the worker's check is the cpu's.
    env = {**stack_env(home=None, model=None), "CUDA_VISIBLE_DEVICES": ""}

    up = subprocess.run(
        [*SDQ, "up", "--detach"], env=env, cwd=project, capture_output=True, text=True, timeout=60
    )
    assert up.returncode == 1
    lines = [line for line in up.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, up.stderr
    where = f"SDQ_ENV=production (from {env_file}, line {line_of(env_file, 'SDQ_ENV=')})"
    assert lines[0].startswith(f"error: {where} stops worker-budget"), lines[0]
    assert "set SDQ_ENV=development there" in lines[0]
    assert not (project / ".sdq" / "stack.json").exists()

    # What the message says, and what the notes then say: the tiny model, not the hub's SDXL.
    text = env_file.read_text().replace("SDQ_ENV=production", "SDQ_ENV=development")
    text = re.sub(r"^SDQ_(VAE_)?MODEL=.*$", "", text, flags=re.MULTILINE)
    env_file.write_text(text)
    up = subprocess.run(
        [*SDQ, "up", "--detach"], env=env, cwd=project, capture_output=True, text=True, timeout=240
    )
    try:
        assert up.returncode == 0, up.stderr
        assert "note:" not in up.stderr
        assert '{"model"' not in up.stdout + up.stderr  # build-tiny's line is for scripts
        assert "building the tiny sdxl model" in up.stderr
        key = re.search(r"API key\s+(sdq_\S+)", up.stderr)
        assert key, up.stderr
        response = httpx.post(
            f"http://127.0.0.1:{env['SDQ_API_PORT']}/stable-diffusion-budget",
            headers={"Authorization": key.group(1)},
            files={"inputText": (None, "a red kite")},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        assert response.content[:2] == b"\xff\xd8"
        # The production .env back in place: it stops a start, never a running stack's ps/down.
        env_file.write_text(text.replace("SDQ_ENV=development", "SDQ_ENV=production"))
        ps = subprocess.run(
            [*SDQ, "ps"], env=env, cwd=project, capture_output=True, text=True, timeout=60
        )
        assert ps.returncode == 0 and re.search(r"^api\s+\d+\s+running", ps.stdout, re.M), ps
    finally:
        down = subprocess.run(
            [*SDQ, "down"], env=env, cwd=project, capture_output=True, text=True, timeout=90
        )
    assert down.returncode == 0 and "stopped: valkey" in down.stderr, down.stderr
