import pytest
from pydantic import ValidationError

from common.settings import Settings


def test_production_refuses_the_development_secret() -> None:
    with pytest.raises(ValidationError, match="development placeholder"):
        Settings(_env_file=None, env="production")  # type: ignore[call-arg]
    # The other production checks: tests/unit/test_production_settings.py.
    Settings(
        _env_file=None,  # type: ignore[call-arg]
        env="production",
        s3_access_key="a41c9e2b7d5f3e18",
        s3_secret_key="a-real-secret-of-32-characters-x",  # type: ignore[arg-type]
        metrics_token="0d9c8b7a6f5e4d3c2b1a",  # type: ignore[arg-type]
    )


def test_broker_defaults_to_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDQ_REDIS_URL", "redis://store:6379/1")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.effective_broker_url == "redis://store:6379/1"
    monkeypatch.setenv("SDQ_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    assert Settings(_env_file=None).effective_broker_url.startswith("amqp://")  # type: ignore[call-arg]


def test_local_storage_needs_a_directory() -> None:
    with pytest.raises(ValidationError, match="SDQ_LOCAL_STORAGE_DIR"):
        Settings(_env_file=None, storage_backend="local")  # type: ignore[call-arg]


def test_json_logs_on_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import logging

    from common.settings import get_settings
    from producer.cli.base import setup_logging as _logging

    monkeypatch.setenv("SDQ_LOG_JSON", "1")
    get_settings.cache_clear()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        _logging()
        logging.getLogger("workers.execute").info("job %s: attempt %d", "job_abc", 1)
        line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        get_settings.cache_clear()
    record = json.loads(line)
    assert record["message"] == "job job_abc: attempt 1"
    assert record["levelname"] == "INFO" and record["name"] == "workers.execute"
