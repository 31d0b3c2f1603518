"""The producer's long-running processes: `sdq api`, `dispatcher`, `reconcile` (the worker's
and Flower's are in ``workers.cli``)."""

from __future__ import annotations

import json
import signal
from typing import Annotated

import typer

from producer.cli.base import app, checked_settings, setup_logging


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
