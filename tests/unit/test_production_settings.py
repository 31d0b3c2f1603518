"""SDQ_ENV=production refuses every placeholder the deploy files ship, short secrets, a Redis
without a password beyond loopback and loopback webhooks, each naming its setting in one line,
all at once; real values start. Development is untouched."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr, ValidationError

from common.settings import Settings, refusals

ROOT = Path(__file__).resolve().parents[2]
#: What a production deployment with real secrets sets.
REAL: dict[str, Any] = {
    "env": "production",
    "redis_url": "redis://:9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c@valkey:6379/0",
    "s3_access_key": "a41c9e2b7d5f3e18",
    "s3_secret_key": "4b8d2f6a0c9e1b3d5f7a9c2e4b6d8f0a",
    "flower_basic_auth": "ops:7c1e5a9b3d2f4e6a8c0b",
    "admin_token": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4",
    "metrics_token": "0d9c8b7a6f5e4d3c2b1a",
    "remote_api_key": "hp_live_2b7e151628aed2a6",
}
_SECRET_NAME = re.compile(r"(ACCESS_KEY|API_KEY|SECRET|SECRET_KEY|TOKEN|AUTH|PASSWORD)$")


def production(**values: Any) -> Settings:
    return Settings(_env_file=None, **{**REAL, **values})  # type: ignore[call-arg]


def refused(**values: Any) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        production(**values)
    return refusals(caught.value)


def is_secret(name: str, value: str) -> bool:
    """A setting the deploy files must ship only as a placeholder: typed as a secret, named
    like one, or a URL with a password in it."""
    field = Settings.model_fields.get(name.removeprefix("SDQ_").lower())
    typed = field is not None and SecretStr in getattr(field.annotation, "__args__", ())
    typed = typed or (field is not None and field.annotation is SecretStr)
    return bool(value) and (typed or bool(_SECRET_NAME.search(name)) or "@" in value)


def env_example() -> list[tuple[str, str]]:
    """Every secret of .env.example, commented out or not, with the value it ships. The
    store's password for docker compose (VALKEY_PASSWORD) reaches sdq in SDQ_REDIS_URL."""
    found = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if not match:
            continue
        name, value = match[1], match[2].strip()
        if re.match(r"(VALKEY|REDIS)_PASSWORD$", name) and value:
            found.append(("SDQ_REDIS_URL", f"redis://:{value}@valkey:6379/0"))
        elif name.startswith("SDQ_") and is_secret(name, value):
            found.append((name, value))
    return found


def k8s_secret() -> list[tuple[str, str]]:
    docs = yaml.safe_load_all((ROOT / "infra" / "k8s" / "config.yaml").read_text())
    found = []
    for doc in docs:
        if doc and doc.get("kind") == "Secret":
            for name, value in (doc.get("stringData") or {}).items():
                if name.startswith("SDQ_") and is_secret(name, str(value)):
                    found.append((name, str(value)))
    return found


def compose_defaults() -> list[tuple[str, str]]:
    """``${SDQ_X:-default}`` and literal values of secrets in docker-compose.yml."""
    text = (ROOT / "docker-compose.yml").read_text()
    found = re.findall(r"\$\{(SDQ_[A-Z0-9_]+):-([^}]+)\}", text)
    found += re.findall(r"^\s+(SDQ_[A-Z0-9_]+):\s+([^$\s{][^\s]*)\s*$", text, flags=re.M)
    return [(name, value.strip("'\"")) for name, value in found if is_secret(name, value)]


SHIPPED = sorted({*env_example(), *k8s_secret(), *compose_defaults()})


def test_the_deploy_files_ship_their_secrets() -> None:
    names = {name for name, _ in env_example()}
    # Guards the parsing: a rename of the file's lines must not empty the parametrization.
    assert {"SDQ_S3_ACCESS_KEY", "SDQ_S3_SECRET_KEY", "SDQ_FLOWER_BASIC_AUTH"} <= names
    assert {"SDQ_METRICS_TOKEN", "SDQ_REDIS_URL"} <= names
    assert {name for name, _ in k8s_secret()} >= {"SDQ_S3_SECRET_KEY"}


def test_real_values_start() -> None:
    settings = production()
    assert settings.env == "production" and settings.metrics_token is not None


@pytest.mark.parametrize(("name", "value"), SHIPPED, ids=[f"{n}={v}" for n, v in SHIPPED])
def test_each_shipped_placeholder_refuses_naming_its_setting(name: str, value: str) -> None:
    lines = refused(**{name.removeprefix("SDQ_").lower(): value})
    assert len(lines) == 1, lines
    assert lines[0].startswith(name) and "placeholder" in lines[0], lines[0]


def test_the_development_defaults_are_refused_with_the_known_words() -> None:
    lines = refused(s3_access_key="sdq-dev", s3_secret_key="sdq-dev-secret")
    assert lines == [
        "SDQ_S3_ACCESS_KEY is a placeholder; set the access key of your S3 identity "
        "(`openssl rand -hex 16` makes one for SeaweedFS or MinIO)",
        "SDQ_S3_SECRET_KEY is the development placeholder; set a real secret in production",
    ]


def test_short_secrets_are_refused_with_the_minimum() -> None:
    assert refused(s3_secret_key="0123456789abcde") == [
        "SDQ_S3_SECRET_KEY is 15 characters; production needs at least 16: make one with "
        "`openssl rand -hex 32`"
    ]
    [line] = refused(admin_token="0123456789abcdef0123456789abcde")  # 31
    assert line.startswith("SDQ_ADMIN_TOKEN is 31 characters; production needs at least 32")
    [line] = refused(flower_basic_auth="ops:short")
    assert line.startswith("SDQ_FLOWER_BASIC_AUTH's password is 5 characters")
    assert refused(flower_basic_auth="no-colon-here-at-all") == [
        "SDQ_FLOWER_BASIC_AUTH is not user:password"
    ]


def test_redis_and_broker_need_a_password_beyond_loopback() -> None:
    [line] = refused(redis_url="redis://valkey:6379/0")
    assert line.startswith("SDQ_REDIS_URL has no password and valkey is beyond loopback")
    [line] = refused(broker_url="amqp://guest:guest@rabbitmq:5672//")
    assert (
        line == "SDQ_BROKER_URL's password is a placeholder; make one with `openssl rand -hex 32`"
    )
    [line] = refused(redis_url="rediss://:short@redis.internal:6380/0")
    assert line.startswith("SDQ_REDIS_URL's password is 5 characters")
    # Loopback, or a Unix socket: the server is this machine's own.
    for url in ("redis://127.0.0.1:6390/0", "redis://localhost:6379/1", "unix:///run/redis.sock"):
        assert production(redis_url=url).redis_url == url


def test_loopback_webhooks_and_open_metrics_are_refused() -> None:
    [line] = refused(webhook_allow_loopback=True)
    assert line.startswith("SDQ_WEBHOOK_ALLOW_LOOPBACK is on")
    [line] = refused(metrics_token=None)
    assert line.startswith("SDQ_METRICS_TOKEN is not set") and "SDQ_METRICS_PORT" in line
    assert production(metrics_token=None, metrics_port=9100).metrics_port == 9100


def test_every_refusal_is_reported_at_once() -> None:
    lines = refused(
        s3_secret_key="change-me-s3-secret-key",
        redis_url="redis://valkey:6379/0",
        webhook_allow_loopback=True,
        metrics_token=None,
    )
    assert [line.split(" ", 1)[0] for line in lines] == [
        "SDQ_S3_SECRET_KEY",
        "SDQ_METRICS_TOKEN",
        "SDQ_REDIS_URL",
        "SDQ_WEBHOOK_ALLOW_LOOPBACK",
    ]


def test_development_keeps_its_defaults() -> None:
    settings = Settings(_env_file=None, webhook_allow_loopback=True)  # type: ignore[call-arg]
    assert settings.env == "development" and settings.s3_access_key == "sdq-dev"
    assert settings.effective_image_ttl == settings.job_ttl_seconds


def registered(bench: str) -> list[str]:
    code = (
        "from workers import tasks; from workers.celery_app import app; "
        "print(' '.join(sorted(n for n in app.tasks if n.startswith('sdq.'))))"
    )
    env = {"SDQ_BENCH": bench, "PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_benchmark_tasks_only_with_sdq_bench() -> None:
    assert registered("0") == ["sdq.generate"]
    assert registered("1") == ["sdq.bench.noop", "sdq.bench.pipeline", "sdq.generate"]
