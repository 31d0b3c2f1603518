"""Client commands: submit jobs and batches, follow, list and cancel them over the API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from common.job import JobRequest
from producer.cli.base import app, err, fail

if TYPE_CHECKING:
    from producer.client import Client

ApiUrl = Annotated[str, typer.Option("--url", envvar="SDQ_API_URL", help="The sdq API.")]
ApiKeyOpt = Annotated[
    str, typer.Option("--key", envvar="SDQ_API_KEY", help="Your API key.", show_default=False)
]
DEFAULT_URL = "http://127.0.0.1:8000"


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
            raise fail(f"{exc.status_code}: {exc.message}") from None


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
        raise fail(str(exc), 2) from None
    with _api(url, key) as client:
        job = client.submit(request)
        if wait or output:
            _follow(client, job.id)
            job = client.get(job.id)
            if job.status.value != "succeeded":
                raise fail(f"job {job.id} {job.status.value}: {job.error or ''}")
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
            raise fail(exc.message, 2) from None
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
