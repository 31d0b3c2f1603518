"""The local stack: `sdq up` and `sdq down`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Annotated

import typer

from common.settings import get_settings
from producer.cli.base import app, err, fail, setup_logging


@app.command()
def up(
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Return once every service is healthy.")
    ] = False,
    credits: Annotated[int, typer.Option(help="Credits of the API key it prints.")] = 1000,
) -> None:
    """Start the whole local stack: Valkey, SeaweedFS S3, the API, a worker per tier, Flower."""
    from common.keys import KeyStore
    from common.redis import connect
    from producer.stack import Stack, StackError

    setup_logging()
    settings = get_settings()
    if settings.model is None and not (settings.tiny_model_dir / "model_index.json").exists():
        err.print(f"building the tiny SDXL model in {settings.tiny_model_dir} ...")
        build = [sys.executable, "-m", "producer.cli", "models", "build-tiny"]
        subprocess.run([*build, str(settings.tiny_model_dir)], check=True)
    stack = Stack(settings)
    started_at = time.monotonic()
    try:
        services = stack.start(on_ready=lambda name: err.print(f"[green]ready[/green] {name}"))
    except StackError as exc:
        raise fail(str(exc)) from None
    key, _ = KeyStore(connect(settings.redis_url)).create(credits, name="sdq up")
    api = f"http://{settings.api_host}:{settings.api_port}"
    err.print(
        f"\n[bold]sdq is up[/bold] in {time.monotonic() - started_at:.1f}s\n"
        f"  API      {api}  (docs {api}/docs)\n"
        f"  Flower   http://{settings.flower_host}:{settings.flower_port}\n"
        f"  S3       {settings.s3_endpoint_url}  bucket {settings.s3_bucket}\n"
        f"  Redis    {settings.redis_url}\n"
        f"  logs     {stack.logs}\n"
        f"  API key  {key}  ({credits} credits)\n\n"
        f"  curl -H 'Authorization: {key}' -F 'inputText=An astronaut riding a horse on Mars' \\\n"
        f"       -F 'guidanceScale=10' -o astronaut_on_mars.jpg {api}/stable-diffusion-normal\n",
        soft_wrap=True,
    )
    if detach:
        err.print("detached; stop it with `sdq down`")
        return

    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    err.print("press Ctrl-C to stop")
    exited = None
    while not stopping and exited is None:
        time.sleep(0.5)
        exited = next((s for s in services if s.process and s.process.poll() is not None), None)
    if exited is not None:
        err.print(f"[red]{exited.name} exited[/red]; its log ends with:\n{stack.tail(exited.name)}")
    err.print("stopping ...")
    stack.stop(services)
    err.print("stopped")
    if exited is not None:
        raise typer.Exit(1)


@app.command()
def down() -> None:
    """Stop a stack started with `sdq up --detach`."""
    from producer.stack import Stack

    stopped = Stack(get_settings()).stop()
    err.print(f"stopped: {', '.join(stopped)}" if stopped else "no stack is running")
