"""The ``sdq`` command line."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from common.job import JobRequest
from common.settings import get_settings

if TYPE_CHECKING:
    from common.keys import KeyStore
    from producer.client import Client

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
    settings = get_settings()
    handler = logging.StreamHandler()
    if settings.log_json:
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter("%(asctime)s %(levelname)s %(name)s %(process)d %(message)s")
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    # One line per health probe of `sdq up` is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
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
        raise _fail(f"cannot reach the job store at {get_settings().redis_url}: {exc}") from None
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
        raise _fail(exc.message) from None
    err.print(f"revoked {record.id}")


def _keys() -> KeyStore:
    from common.keys import KeyStore
    from common.redis import connect

    settings = get_settings()
    return KeyStore(connect(settings.redis_url), settings.default_rate_per_second)


def _size(value: str | None) -> tuple[int | None, int | None]:
    if value is None:
        return None, None
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise typer.BadParameter("use WIDTHxHEIGHT, for example 1024x1024") from None
    return width, height


@contextmanager
def _api(url: str, key: str) -> Iterator[Client]:
    """A client whose API errors end the command with their status and message."""
    from producer.client import ApiError, Client

    with Client(url, key) as client:
        try:
            yield client
        except ApiError as exc:
            raise _fail(f"{exc.status_code}: {exc.message}") from None


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
    images: Annotated[int, typer.Option("--images", help="Images to make.")] = 1,
    priority: Annotated[int, typer.Option(help="0-9; 9 runs first within the tier.")] = 5,
    webhook: Annotated[str | None, typer.Option(help="URL for signed status webhooks.")] = None,
    output_format: Annotated[str, typer.Option("--format", help="jpeg, png or webp.")] = "jpeg",
    wait: Annotated[bool, typer.Option(help="Wait, with a progress bar of the steps.")] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Save the image here (implies --wait)."),
    ] = None,
) -> None:
    """Submit a job. Prints the job as JSON; with --wait or -o, waits and saves the images."""
    from pydantic import ValidationError

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
            num_images=images,
            priority=priority,
            webhook_url=webhook,
            output_format=output_format,
        )
    except ValidationError as exc:
        raise _fail(str(exc), 2) from None
    with _api(url, key) as client:
        job = client.submit(request)
        if wait or output:
            _follow(client, job.id)
            job = client.get(job.id)
            if job.status.value != "succeeded":
                raise _fail(f"job {job.id} {job.status.value}: {job.error or ''}")
            if output is not None:
                for image in job.images:
                    path = output if image.index == 0 else _numbered(output, image.index)
                    path.write_bytes(client.download(image.url or ""))
                    err.print(f"saved {path}")
    typer.echo(job.model_dump_json(indent=2))


def _numbered(path: Path, index: int) -> Path:
    return path.with_name(f"{path.stem}_{index}{path.suffix}")


def _follow(client: Client, job_id: str) -> None:
    """A progress bar of denoising steps, fed by the job's server-sent events."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(f"{job_id}: queued", total=None)
        for event in client.events(job_id):
            progress = event.data.get("progress") or {}
            if event.type == "job.progress" and progress:
                bar.update(
                    task,
                    description=f"{job_id}: step",
                    completed=progress["step"],
                    total=progress["total"],
                )
            else:
                bar.update(task, description=f"{job_id}: {event.data.get('status', '')}")


@app.command()
def batch(
    file: Annotated[
        Path,
        typer.Argument(
            help='JSONL: one job per line ({"prompt": ...}).', exists=True, dir_okay=False
        ),
    ],
    key: ApiKeyOpt,
    out: Annotated[Path, typer.Option("--out", help="Where images and results.jsonl go.")] = Path(
        "out"
    ),
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Jobs in flight.")] = 4,
    url: ApiUrl = DEFAULT_URL,
) -> None:
    """Render every line of a JSONL file. Run it again to resume: finished lines are
    skipped, and lines in flight get their jobs back instead of being charged twice."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from common.errors import InvalidRequest
    from producer.batch import BatchRun, LineResult

    with _api(url, key) as client:
        try:
            run = BatchRun(client, file, out, concurrency)
        except InvalidRequest as exc:
            raise _fail(exc.message, 2) from None
        pending = run.pending()
        total = len(run.requests)
        err.print(f"{total - len(pending)} of {total} done already; rendering {len(pending)}")
        failed = 0
        columns = (TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err) as bar:
            task = bar.add_task("batch", total=total, completed=total - len(pending))

            def done(result: LineResult) -> None:
                nonlocal failed
                failed += result.status != "succeeded"
                bar.advance(task)

            run.run(on_done=done)
    err.print(
        f"done: {len(pending) - failed} succeeded, {failed} failed; see {out / 'results.jsonl'}"
    )
    if failed:
        raise typer.Exit(1)


@app.command()
def status(job_id: str, key: ApiKeyOpt, url: ApiUrl = DEFAULT_URL) -> None:
    """Show a job as JSON."""
    with _api(url, key) as client:
        job = client.get(job_id)
    typer.echo(job.model_dump_json(indent=2))


@app.command()
def cancel(job_id: str, key: ApiKeyOpt, url: ApiUrl = DEFAULT_URL) -> None:
    """Cancel a job (refunded); a running job stops within 0.1 s and one denoising step."""
    with _api(url, key) as client:
        job = client.cancel(job_id)
    err.print(f"{job.id} canceled")


@app.command()
def jobs(
    key: ApiKeyOpt,
    url: ApiUrl = DEFAULT_URL,
    status_filter: Annotated[
        str | None, typer.Option("--status", help="Only jobs in this status.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
) -> None:
    """List your jobs, newest first."""
    from rich.table import Table

    with _api(url, key) as client:
        page = client.jobs(status=status_filter, limit=limit)
    table = Table("id", "tier", "status", "created", "prompt")
    for job in page.jobs:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
        table.add_row(job.id, job.tier, job.status.value, created, job.request.prompt[:40])
    Console().print(table)


@app.command()
def worker(
    tier: Annotated[
        list[str], typer.Option("--tier", "-t", help="Tier to serve; repeat to serve several.")
    ],
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

    _logging()
    run_worker(tier, concurrency=concurrency, loglevel=get_settings().log_level, gpu=gpu, name=name)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (SDQ_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (SDQ_API_PORT).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Run the HTTP API under uvicorn."""
    import uvicorn

    _logging()
    settings = get_settings()
    from producer.api.app import server_options

    uvicorn.run(
        "producer.api.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers,
        log_level=settings.log_level.lower(),
        **server_options(settings),
    )


@app.command()
def dispatcher() -> None:
    """Send webhooks: claim due deliveries from the store and post them, until stopped.
    Run it as its own process (or set SDQ_WEBHOOK_DISPATCHER=1 to keep it in the API)."""
    from common.webhooks import serve

    _logging()
    serve(get_settings())


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

    _logging()
    reconciler = Reconciler(AppState.build(get_settings()).jobs)
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

    settings = get_settings()
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
        raise _fail(
            f"Flower would listen on {address} without auth; "
            "set SDQ_FLOWER_BASIC_AUTH=user:password",
            2,
        )
    from workers.celery_app import app as celery_app

    celery_app.start(argv)


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
