"""What ``SDQ_ENV=production`` refuses to start with.

Every placeholder secret the deploy files ship (``.env.example``, ``docker-compose.yml``, the
Kubernetes Secret) and the development defaults, secrets shorter than a minimum, a Redis or
broker URL without a password beyond loopback, webhooks allowed to loopback, and ``/metrics``
open to anyone. Each refusal is one line that starts with the setting it names; all of them
are reported at once, so an operator fixes the whole file in one pass.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from pydantic import SecretStr

if TYPE_CHECKING:
    from common.settings import Settings

#: The development defaults of the S3 identity (``sdq up`` starts SeaweedFS with them).
DEV_S3_ACCESS = "sdq-dev"
DEV_S3_SECRET = "sdq-dev-secret"
#: Secrets this short are guessable; the admin token opens every key, so it is longer.
MIN_SECRET = 16
MIN_ADMIN_TOKEN = 32
#: How to make a real secret, quoted in each refusal.
MAKE_ONE = "make one with `openssl rand -hex 32`"

#: What the shipped placeholders look like (``change-me...``), and the defaults that tools
#: ship with (MinIO, RabbitMQ, Flower examples): a value matching either is no secret.
_PLACEHOLDER = re.compile(r"change[-_ ]?me|replace[-_ ]?me|placeholder|example|your[-_ ]", re.I)
_WELL_KNOWN = frozenset(
    {DEV_S3_ACCESS, DEV_S3_SECRET, "admin", "password", "secret", "guest", "minioadmin", "test"}
)


def is_placeholder(value: str) -> bool:
    """Whether ``value`` is a shipped placeholder or a tool's default, not a real secret."""
    return bool(_PLACEHOLDER.search(value)) or value.strip().lower() in _WELL_KNOWN


def problems(settings: Settings) -> list[str]:
    """Every reason ``settings`` may not run in production, one line each, naming the
    setting first; empty when they may."""
    found: list[str] = []
    if settings.storage_backend == "s3":
        found += _s3_keys(settings)
    if settings.flower_basic_auth is not None:
        found += _basic_auth("SDQ_FLOWER_BASIC_AUTH", settings.flower_basic_auth)
    if settings.admin_token is not None:
        found += _secret("SDQ_ADMIN_TOKEN", settings.admin_token, MIN_ADMIN_TOKEN)
    found += _metrics(settings)
    if settings.remote_api_key is not None and is_placeholder(_text(settings.remote_api_key)):
        found.append("SDQ_REMOTE_API_KEY is a placeholder; set the key of your remote API")
    found += _url("SDQ_REDIS_URL", settings.redis_url)
    if settings.broker_url is not None:
        found += _url("SDQ_BROKER_URL", settings.broker_url)
    if settings.webhook_allow_loopback:
        found.append(
            "SDQ_WEBHOOK_ALLOW_LOOPBACK is on: webhooks could reach this machine's own "
            "services; it is for development only, unset it in production"
        )
    return found


def _text(value: SecretStr | str) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _secret(name: str, value: SecretStr | str, minimum: int = MIN_SECRET) -> list[str]:
    text = _text(value)
    if text == DEV_S3_SECRET:
        # The wording operators already know.
        return [f"{name} is the development placeholder; set a real secret in production"]
    if is_placeholder(text):
        return [f"{name} is a placeholder; {MAKE_ONE}"]
    if len(text) < minimum:
        return [
            f"{name} is {len(text)} characters; production needs at least {minimum}: {MAKE_ONE}"
        ]
    return []


def _s3_keys(settings: Settings) -> list[str]:
    found = []
    if is_placeholder(settings.s3_access_key):
        found.append(
            "SDQ_S3_ACCESS_KEY is a placeholder; set the access key of your S3 identity "
            "(`openssl rand -hex 16` makes one for SeaweedFS or MinIO)"
        )
    return found + _secret("SDQ_S3_SECRET_KEY", settings.s3_secret_key)


def _basic_auth(name: str, value: SecretStr) -> list[str]:
    user, sep, password = _text(value).partition(":")
    if not sep or not user:
        return [f"{name} is not user:password"]
    return _password(name, password)


def _password(name: str, password: str) -> list[str]:
    """``_secret`` of the password a setting holds (a URL's, a user:password pair's)."""
    return [
        line.replace(f"{name} is", f"{name}'s password is", 1) for line in _secret(name, password)
    ]


def _metrics(settings: Settings) -> list[str]:
    if settings.metrics_token is not None:
        return _secret("SDQ_METRICS_TOKEN", settings.metrics_token)
    if settings.metrics_port is None:
        return [
            "SDQ_METRICS_TOKEN is not set: production serves /metrics only to a bearer token "
            f"({MAKE_ONE}), or on a port of its own (SDQ_METRICS_PORT)"
        ]
    return []


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(name: str, url: str) -> list[str]:
    """A Redis or AMQP URL: beyond loopback it needs a password, and any password it has
    must be a real one. A Unix socket is local."""
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        return []
    password = unquote(parsed.password) if parsed.password else ""
    if not password:
        if _loopback(parsed.hostname or ""):
            return []
        return [
            f"{name} has no password and {parsed.hostname} is beyond loopback: set one on the "
            f"server and in the URL (redis://:PASSWORD@host:6379/0; {MAKE_ONE})"
        ]
    return _password(name, password)
