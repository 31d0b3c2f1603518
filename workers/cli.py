"""The worker side's commands, composed into ``sdq`` by ``producer.cli``: ``sdq worker``,
``sdq flower`` (the workers' Celery app) and ``sdq models build-tiny``. Nothing heavy at
import: torch and diffusers load inside the commands that need them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, cast

import typer

from common.cli import checked_settings, err, fail, setup_logging
from common.models import Family
from common.settings import Settings


def worker(
    tier: Annotated[
        list[str], typer.Option("--tier", "-t", help="Tier to serve; repeat to serve several.")
    ],
    model: Annotated[
        str | None, typer.Option(help="Model to serve; default: the first tier's.")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Pool children (one per GPU).")] = 1,
    gpu: Annotated[
        str | None,
        typer.Option(help="The GPU to pin (sets CUDA_VISIBLE_DEVICES): one worker per GPU."),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Celery node name (default: TIERS@hostname).")
    ] = None,
) -> None:
    """Run a Celery worker for a tier. Exits 2 when this machine's device may not serve it
    (unless the tier falls back to its remote API on `no_device`)."""
    from workers.main import run_worker

    # Unchecked: the worker's hardware refusal comes before any about the other settings.
    settings = Settings.unchecked()
    setup_logging(settings)
    run_worker(
        tier, model=model, concurrency=concurrency, loglevel=settings.log_level, gpu=gpu, name=name
    )


def flower(
    host: Annotated[str | None, typer.Option(help="Bind address (SDQ_FLOWER_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (SDQ_FLOWER_PORT).")] = None,
) -> None:
    """Run Flower on the workers' broker. Basic auth comes from SDQ_FLOWER_BASIC_AUTH; it is
    required on any address but loopback."""
    import ipaddress
    import os

    settings = checked_settings()
    address = host or settings.flower_host
    try:
        loopback = address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = False
    argv = ["flower", f"--address={address}", f"--port={port or settings.flower_port}"]
    if settings.flower_basic_auth is not None:
        argv.append(f"--basic-auth={settings.flower_basic_auth.get_secret_value()}")
    elif loopback:
        # Flower 2 refuses its REST API without auth unless told otherwise; on loopback,
        # for a local operator, that is what is wanted.
        os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")
    else:
        raise fail(
            f"Flower would listen on {address} without auth; "
            "set SDQ_FLOWER_BASIC_AUTH=user:password",
            2,
        )
    from workers.celery_app import app as celery_app

    celery_app.start(argv)


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
