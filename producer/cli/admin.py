"""Operator commands on the store and the models: `sdq keys ...`, `sdq models ...`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from common.settings import get_settings
from producer.cli.base import err, fail, keys_app, models_app, setup_logging

if TYPE_CHECKING:
    from common.keys import KeyStore


@keys_app.command("create")
def keys_create(
    credits: Annotated[int, typer.Option(min=0, help="Credits the key starts with.")] = 100,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    rate: Annotated[
        float | None,
        typer.Option(
            min=0.01,
            help="Requests a second, in bursts of as many; default SDQ_DEFAULT_RATE_PER_SECOND.",
        ),
    ] = None,
    max_jobs: Annotated[
        int | None,
        typer.Option(min=1, help="Jobs queued or running at once; default SDQ_DEFAULT_MAX_JOBS."),
    ] = None,
    max_priority: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=9,
            help="Higher priorities are capped to this; default SDQ_DEFAULT_MAX_PRIORITY.",
        ),
    ] = None,
) -> None:
    """Create an API key. Prints only the key on stdout, so scripts can capture it."""
    keys = _keys()
    try:
        key, record = keys.create(
            credits, name=name, rate=rate, max_jobs=max_jobs, max_priority=max_priority
        )
    except Exception as exc:
        raise fail(f"cannot reach the job store at {get_settings().redis_url}: {exc}") from None
    err.print(f"created {record.id} with {credits} credits")
    typer.echo(key)


@keys_app.command("revoke")
def keys_revoke(
    key_or_id: Annotated[str, typer.Argument(help="The key itself, or its id (key_...).")],
) -> None:
    """Revoke a key: every API process answers it 403 from its next request on."""
    from common.errors import NotFound

    try:
        record = _keys().revoke(key_or_id)
    except NotFound as exc:
        raise fail(exc.message) from None
    err.print(f"revoked {record.id}")


def _keys() -> KeyStore:
    from common.keys import KeyStore
    from common.redis import connect

    settings = get_settings()
    return KeyStore(connect(settings.redis_url), settings.default_rate_per_second)


@models_app.command("build-tiny")
def build_tiny(
    directory: Annotated[Path, typer.Argument(help="Where to write the pipeline.")],
) -> None:
    """Build a tiny SDXL pipeline with random weights (for tests and `sdq up`)."""
    from workers.tiny import build_tiny as build

    setup_logging()
    build(directory)
    err.print(f"built {directory}")
    typer.echo(json.dumps({"model": str(directory)}))
