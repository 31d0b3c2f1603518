"""The long-running processes: `sdq worker`, `api`, `dispatcher`, `reconcile`, `flower`."""

from __future__ import annotations

import json
import signal
from typing import Annotated

import typer

from common.settings import Settings
from producer.cli.base import app, checked_settings, fail, setup_logging


@app.command()
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


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (SDQ_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (SDQ_API_PORT).")] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="API processes; each listens on the port itself (SO_REUSEPORT), so the "
            "kernel spreads connections evenly, and one that dies is started again.",
        ),
    ] = 1,
) -> None:
    """Run the HTTP API under uvicorn."""
    from producer.api.serve import serve

    settings = checked_settings()
    setup_logging(settings)
    serve(settings, host or settings.api_host, port or settings.api_port, workers, setup_logging)


@app.command()
def dispatcher() -> None:
    """Send webhooks: claim due deliveries from the store and post them, until stopped.
    Run it as its own process (or set SDQ_WEBHOOK_DISPATCHER=1 to keep it in the API)."""
    from common.webhooks import serve

    settings = checked_settings()
    setup_logging(settings)
    serve(settings)


@app.command()
def reconcile(
    once: Annotated[bool, typer.Option("--once", help="One round, then exit.")] = False,
) -> None:
    """Requeue jobs whose worker died (their lease ran out) and send the messages queued jobs
    lack, every SDQ_RECONCILE_INTERVAL_SECONDS, while this process leads (the API processes
    run one too unless SDQ_RECONCILER=0)."""
    import threading

    from producer.api.state import AppState
    from producer.reconciler import Reconciler

    settings = checked_settings()
    setup_logging(settings)
    reconciler = Reconciler(AppState.build(settings).jobs)
    if once:
        done = reconciler.once()
        typer.echo(json.dumps(dict(done)))
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    reconciler.run(stop)


@app.command()
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
