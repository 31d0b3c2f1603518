"""Operator commands on the store and the models: `sdq keys ...`, `sdq models ...`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from common.settings import get_settings
from producer.cli.base import err, fail, keys_app, models_app, setup_logging

if TYPE_CHECKING:
    from common.keys import KeyStore
    from common.models import Family


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
    models: Annotated[
        str,
        typer.Option(
            help="Models beyond each tier's default it may ask for, comma-separated "
            "(e.g. sd15,sd21: available upon request).",
        ),
    ] = "",
) -> None:
    """Create an API key. Prints only the key on stdout, so scripts can capture it."""
    from common.errors import InvalidRequest
    from common.models import load_models

    entitled = [part.strip() for part in models.split(",") if part.strip()]
    try:
        known = load_models(get_settings().models_file)
        for model in entitled:
            known.get(model)
    except InvalidRequest as exc:
        raise fail(f"--models: {exc.message}") from None
    keys = _keys()
    try:
        key, record = keys.create(
            credits,
            name=name,
            rate=rate,
            max_jobs=max_jobs,
            max_priority=max_priority,
            models=list(dict.fromkeys(entitled)),
        )
    except Exception as exc:
        raise fail(f"cannot reach the job store at {get_settings().redis_url}: {exc}") from None
    extra = f", entitled to {', '.join(record.models)}" if record.models else ""
    err.print(f"created {record.id} with {credits} credits{extra}")
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
    family: Annotated[str, typer.Option(help="The model family: sdxl, sd15 or sd21.")] = "sdxl",
) -> None:
    """Build a tiny pipeline of a model family with random weights (for tests and `sdq up`),
    loadable with from_pretrained like the real one."""
    from workers.tiny import build_tiny as build

    setup_logging()
    if family not in ("sdxl", "sd15", "sd21"):
        raise fail(f"unknown family {family!r}; choose one of: sdxl, sd15, sd21", 2)
    build(directory, cast("Family", family))
    err.print(f"built the tiny {family} pipeline in {directory}")
    typer.echo(json.dumps({"model": str(directory)}))
