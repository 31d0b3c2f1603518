"""What would stop ``sdq up`` here, found before it starts anything.

Each problem is one line that names the setting and where its value came from: the
environment, a line of ``.env``, or the default. The usual cause is the ``.env`` written for
docker compose (``cp .env.example .env``) read by the development stack.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from pydantic import ValidationError

from common.settings import Settings, get_settings
from producer.stack import StackError

#: Where pydantic-settings reads the optional .env (relative to the working folder).
ENV_FILE = Path(".env")
_SECRETS = ("KEY", "SECRET", "AUTH", "PASSWORD", "TOKEN")


def origin(name: str) -> str:
    """Where the setting ``name`` (``SDQ_...``) gets its value: the environment wins over
    ``.env``, which wins over the default, as pydantic-settings reads them."""
    if _from_environment(name) is not None:
        return "from the environment"
    line = _from_env_file(name)
    if line is not None:
        return f"from {ENV_FILE.resolve()}, line {line[0]}"
    return "its default"


def _from_environment(name: str) -> str | None:
    return next((v for k, v in os.environ.items() if k.upper() == name and v), None)


def _from_env_file(name: str) -> tuple[int, str] | None:
    try:
        lines = ENV_FILE.read_text().splitlines()
    except OSError:
        return None
    found = None
    for number, line in enumerate(lines, 1):
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and key.strip().upper() == name and value.strip():
            found = number, value.strip().strip("'\"")  # the last one wins
    return found


def named(name: str, value: object) -> str:
    """``SDQ_X=value (from ...)``; a secret's value is not shown."""
    secret = value is None or any(word in name for word in _SECRETS)
    return f"{name if secret else f'{name}={value}'} ({origin(name)})"


def _raw(name: str) -> str | None:
    """The value as given, before validation."""
    found = _from_env_file(name)
    return _from_environment(name) or (found[1] if found else None)


def load_settings() -> Settings:
    """The settings, or StackError with one line per invalid setting and its origin."""
    try:
        return get_settings()
    except ValidationError as exc:
        _production_on_this_machine()
        problems = []
        for error in exc.errors():
            text = str(error["msg"]).removeprefix("Value error, ")
            if error["loc"]:
                name = f"SDQ_{str(error['loc'][0]).upper()}"
                problems.append(f"{named(name, _raw(name))}: {text}")
                continue
            for message in text.splitlines():  # production's refusals: one line each
                names = sorted(set(re.findall(r"SDQ_[A-Z0-9_]+", message)))
                if "production" in message and "SDQ_ENV" not in names:
                    names.insert(0, "SDQ_ENV")
                where = "; ".join(named(n, _raw(n)) for n in names)
                problems.append(f"{message}: {where}" if where else message)
        raise StackError("invalid settings: " + "; ".join(problems)) from None


def _production_on_this_machine() -> None:
    """SDQ_ENV=production (a compose .env) refused: on a machine whose workers it would stop
    anyway, say so first, as a worker does, for that is the one line to change."""
    try:
        unchecked = Settings.unchecked()
    except ValidationError:
        return
    if unchecked.env == "production":
        _check_hardware(unchecked)


def _answers(url: str) -> bool:
    parsed = urlparse(url)
    default = {"redis": 6379, "rediss": 6379, "amqp": 5672, "https": 443}.get(parsed.scheme, 80)
    return _listens(parsed.hostname or "", parsed.port or default)


def _loopback(url: str) -> bool:
    return urlparse(url).hostname in ("127.0.0.1", "localhost", "::1")


def _listens(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 2):
            return True
    except OSError:
        return False


def check(settings: Settings) -> None:
    """Raise StackError, one line, for the first setting that would stop the stack."""
    _check_addresses(settings)
    _check_ports(settings)
    _check_hardware(settings)


def _check_addresses(settings: Settings) -> None:
    """A server `sdq up` would not start (remote, or a broker) must answer already."""
    s3 = settings.s3_endpoint_url if settings.storage_backend == "s3" else None
    for name, url in (
        ("SDQ_REDIS_URL", settings.redis_url),
        ("SDQ_BROKER_URL", settings.broker_url),
        ("SDQ_S3_ENDPOINT_URL", s3),
    ):
        if url and not _loopback(url) and not _answers(url):
            raise StackError(
                f"{named(name, url)} does not answer, and `sdq up` starts its own server only "
                "on a loopback address (a docker compose hostname answers only inside compose)"
            )
    broker = settings.broker_url
    same_server = broker and urlparse(broker).port == urlparse(settings.redis_url).port
    if broker and _loopback(broker) and not same_server and not _answers(broker):
        raise StackError(
            f"{named('SDQ_BROKER_URL', broker)} does not answer, and `sdq up` starts no broker "
            "but the job store's Valkey (unset SDQ_BROKER_URL to use that)"
        )


def _check_ports(settings: Settings) -> None:
    for name, host, port in (
        ("SDQ_API_PORT", settings.api_host, settings.api_port),
        ("SDQ_FLOWER_PORT", settings.flower_host, settings.flower_port),
    ):
        if _listens(host, port):
            raise StackError(
                f"{named(name, port)}: {host}:{port} is taken (another stack, or docker "
                f"compose's, listens there); stop it or set {name} to a free port"
            )


def _check_hardware(settings: Settings) -> None:
    """The worker's own start-up check, made here first: in production a tier runs only on
    the hardware classes it lists (a compose .env says SDQ_ENV=production)."""
    if settings.hardware_override:
        return
    try:
        from common.device import detect  # NVML only: no torch, no CUDA runtime
    except ImportError:
        return
    from common.tiers import load_tiers

    device = detect()
    development = settings.env == "development"
    refused = [
        tier
        for tier in load_tiers(settings.tiers_file)
        if not tier.accepts(device.hardware_class, development=development)
        and not (tier.falls_back("no_device") and settings.remote_enabled)
    ]
    if not refused:
        return
    names = ", ".join(f"worker-{tier.name}" for tier in refused)
    if not development and device.hardware_class == "cpu":
        raise StackError(
            f"{named('SDQ_ENV', settings.env)} stops {names}: in production a tier runs only "
            f"on the GPUs it lists, and this machine has {device.describe()}. `sdq up` is the "
            "development stack: set SDQ_ENV=development there (docker compose sets SDQ_ENV "
            "for its containers itself)"
        )
    needs = "; ".join(f"{tier.name} needs {', '.join(tier.hardware)}" for tier in refused)
    message = f"{names} would refuse to start on {device.describe()} ({needs})"
    raise StackError(f"{message}; SDQ_HARDWARE_OVERRIDE=true serves them here anyway")


def notes(settings: Settings) -> list[str]:
    """What will work, but not as the development stack usually does: a model from the hub
    (a compose .env names SDXL's), which every worker downloads and then runs on its device."""
    found = []
    for name, model in (("SDQ_MODEL", settings.model), ("SDQ_VAE_MODEL", settings.vae_model)):
        if model and not Path(model).expanduser().exists():
            found.append(
                f"{named(name, model)}: every worker loads it from the Hugging Face hub (a "
                "download the first time); unset it for the development default (the tiny model)"
            )
    return found
