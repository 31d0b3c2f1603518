"""The ``sdq`` command line."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from common.job import JobRequest
from common.settings import get_settings

app = typer.Typer(
    help="sdq: self-hosted Stable Diffusion XL rendering on Celery GPU workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(
    help="Manage API keys (talks to the job store directly).", no_args_is_help=True
)
models_app = typer.Typer(help="Build and inspect models.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")

err = Console(stderr=True)

ApiUrl = Annotated[str, typer.Option("--url", envvar="SDQ_API_URL", help="The sdq API.")]
ApiKeyOpt = Annotated[
    str, typer.Option("--key", envvar="SDQ_API_KEY", help="Your API key.", show_default=False)
]
DEFAULT_URL = "http://127.0.0.1:8000"


def _logging() -> None:
    logging.basicConfig(
        level=get_settings().log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per health probe of `sdq up` is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


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

    _logging()
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
        raise _fail(str(exc)) from None
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


@keys_app.command("create")
def keys_create(
    credits: Annotated[int, typer.Option(min=0, help="Credits the key starts with.")] = 100,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
) -> None:
    """Create an API key. Prints only the key on stdout, so scripts can capture it."""
    from common.keys import KeyStore
    from common.redis import connect

    settings = get_settings()
    try:
        key, record = KeyStore(connect(settings.redis_url)).create(credits, name=name)
    except Exception as exc:
        raise _fail(f"cannot reach the job store at {settings.redis_url}: {exc}") from None
    err.print(f"created {record.id} with {credits} credits")
    typer.echo(key)


def _size(value: str | None) -> tuple[int | None, int | None]:
    if value is None:
        return None, None
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise typer.BadParameter("use WIDTHxHEIGHT, for example 1024x1024") from None
    return width, height


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    key: ApiKeyOpt,
    url: ApiUrl = DEFAULT_URL,
    tier: Annotated[str, typer.Option(help="budget, normal or premium.")] = "normal",
    guidance: Annotated[float, typer.Option(help="Guidance scale.")] = 7.5,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (tier default).")] = None,
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT (model default).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (random by default).")] = None,
    negative: Annotated[str | None, typer.Option(help="Negative prompt.")] = None,
    output_format: Annotated[str, typer.Option("--format", help="jpeg, png or webp.")] = "jpeg",
    wait: Annotated[bool, typer.Option(help="Wait for the result.")] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Save the image here (implies --wait).")
    ] = None,
) -> None:
    """Submit a job. Prints the job as JSON; with --wait or -o, waits and saves the image."""
    from pydantic import ValidationError

    from producer.client import ApiError, Client

    width, height = _size(size)
    try:
        request = JobRequest(
            prompt=prompt,
            negative_prompt=negative,
            tier=tier,
            guidance_scale=guidance,
            steps=steps,
            width=width,
            height=height,
            seed=seed,
            output_format=output_format,
        )
    except ValidationError as exc:
        raise _fail(str(exc), 2) from None
    with Client(url, key) as client:
        try:
            job = client.submit(request)
            if wait or output:
                with err.status(f"{job.id}: waiting"):
                    job = client.wait(job.id)
                if job.status.value != "succeeded":
                    raise _fail(f"job {job.id} {job.status.value}: {job.error or ''}")
                if output is not None and job.images and job.images[0].url:
                    output.write_bytes(client.download(job.images[0].url))
                    err.print(f"saved {output}")
        except ApiError as exc:
            raise _fail(f"{exc.status_code}: {exc.message}") from None
    typer.echo(job.model_dump_json(indent=2, exclude={"key_id"}))


@app.command()
def status(job_id: str, key: ApiKeyOpt, url: ApiUrl = DEFAULT_URL) -> None:
    """Show a job as JSON."""
    from producer.client import ApiError, Client

    with Client(url, key) as client:
        try:
            job = client.get(job_id)
        except ApiError as exc:
            raise _fail(f"{exc.status_code}: {exc.message}") from None
    typer.echo(job.model_dump_json(indent=2, exclude={"key_id"}))


@app.command()
def worker(
    tier: Annotated[
        list[str], typer.Option("--tier", "-t", help="Tier to serve; repeat to serve several.")
    ],
    concurrency: Annotated[int, typer.Option(help="Pool children (one per GPU).")] = 1,
) -> None:
    """Run a Celery worker for a tier. Exits 2 when this machine's device may not serve it."""
    from workers.main import run_worker

    _logging()
    run_worker(tier, concurrency=concurrency, loglevel=get_settings().log_level)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (SDQ_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (SDQ_API_PORT).")] = None,
) -> None:
    """Run the HTTP API under uvicorn."""
    import uvicorn

    _logging()
    settings = get_settings()
    uvicorn.run(
        "producer.api.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level=settings.log_level.lower(),
    )


@app.command()
def flower(
    host: Annotated[str | None, typer.Option(help="Bind address (SDQ_FLOWER_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (SDQ_FLOWER_PORT).")] = None,
) -> None:
    """Run Flower on the workers' broker."""
    import os

    settings = get_settings()
    # Flower 2 refuses its REST API without auth unless told otherwise; on loopback that is
    # what a local operator wants.
    os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")
    from workers.celery_app import app as celery_app

    celery_app.start(
        [
            "flower",
            f"--address={host or settings.flower_host}",
            f"--port={port or settings.flower_port}",
        ]
    )


@models_app.command("build-tiny")
def build_tiny(
    directory: Annotated[Path, typer.Argument(help="Where to write the pipeline.")],
) -> None:
    """Build a tiny SDXL pipeline with random weights (for tests and `sdq up`)."""
    from workers.tiny import build_tiny as build

    _logging()
    build(directory)
    err.print(f"built {directory}")
    typer.echo(json.dumps({"model": str(directory)}))


if __name__ == "__main__":
    app()
