"""Client commands: submit jobs and batches, follow, list and cancel them over the API."""

from __future__ import annotations

import base64
import json
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from common.errors import InvalidRequest, SdqError
from producer.cli.base import app, err, fail

if TYPE_CHECKING:
    from rich.table import Table

    from producer.batch import BatchRun, Summary
    from producer.client import Client
    from producer.schemas import JobView

ApiUrl = Annotated[str, typer.Option("--url", envvar="SDQ_API_URL", help="The sdq API.")]
ApiKeyOpt = Annotated[
    str, typer.Option("--key", envvar="SDQ_API_KEY", help="Your API key.", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead.")]
DEFAULT_URL = "http://127.0.0.1:8000"
#: The exit status of a command stopped by Ctrl-C, as a shell reports one killed by SIGINT.
INTERRUPTED = 130


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
    """A client whose errors end the command with one line on stderr, never a traceback:
    status 2 for a request refused before it was sent, 1 for everything the API (or the
    way to it) answered."""
    from producer.client import ApiError, AuthenticationError, Client, ServerError, UnreachableError

    try:
        with Client(url, key) as client:
            yield client
    except InvalidRequest as exc:
        raise fail(exc.message, 2) from None
    except AuthenticationError as exc:
        # A model the key is not entitled to is refused with 403 too, but the key is good.
        hint = "" if exc.details.get("model") else " (check --key or SDQ_API_KEY)"
        raise fail(f"{exc.status_code}: {exc.message}{hint}") from None
    except ServerError as exc:
        raise fail(f"{exc.status_code}: {exc.message} (the API failed; see its logs)") from None
    except ApiError as exc:
        raise fail(f"{exc.status_code}: {exc.message}") from None
    except UnreachableError as exc:
        raise fail(f"{exc.message} (check --url or SDQ_API_URL)") from None
    except SdqError as exc:
        raise fail(exc.message) from None


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    key: ApiKeyOpt,
    url: ApiUrl = DEFAULT_URL,
    tier: Annotated[str, typer.Option(help="A tier: `GET /v1/tiers` lists them.")] = "normal",
    style: Annotated[
        str | None, typer.Option(help="A style's id or slug (`GET /v1/styles` lists them).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="A model the tier serves (sd15, sd21: upon request).")
    ] = None,
    init_image: Annotated[
        Path | None,
        typer.Option(
            "--init-image", help="Image-to-image: start from this PNG, JPEG or WebP.", exists=True
        ),
    ] = None,
    strength: Annotated[
        float | None, typer.Option(min=0, max=1, help="Image-to-image: 0 keeps it, 1 ignores it.")
    ] = None,
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
    width, height = _size(size)
    fields = {
        "prompt": prompt,
        "negative_prompt": negative,
        "tier": tier,
        "guidance_scale": guidance,
        "steps": steps,
        "width": width,
        "height": height,
        "seed": seed,
        "num_images": images,
        "priority": priority,
        "webhook_url": webhook,
        "output_format": output_format,
        "style": int(style) if style is not None and style.isdigit() else style,
        "model": model,
        "strength": strength,
    }
    if init_image is not None:
        fields["init_image"] = base64.b64encode(init_image.read_bytes()).decode()
    with _api(url, key) as client:
        # Checked against the deployment's tiers, so a limit reads as the tier's.
        request = client.check({name: value for name, value in fields.items() if value is not None})
        job = client.submit(request)
        if wait or output:
            _follow(client, job.id)
            job = client.get(job.id)
            if job.status.value != "succeeded":
                raise fail(f"job {job.id} {job.status.value}: {job.error or ''}")
            if output is not None:
                for image in job.images:
                    if image.url is None:
                        raise fail(f"job {job.id}: its images have expired and were deleted")
                    path = output if image.index == 0 else _numbered(output, image.index)
                    path.write_bytes(client.download(image.url))
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
    retry: Annotated[
        bool, typer.Option("--retry/--no-retry", help="Run lines that failed before again.")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary on stdout at the end.")
    ] = False,
    url: ApiUrl = DEFAULT_URL,
) -> None:
    """Render every line of a JSONL file. The whole file is checked against the tiers
    before anything is charged. Run it again to resume: succeeded lines are skipped,
    failed ones retried, and lines in flight get their jobs back instead of being charged
    twice. Ctrl-C stops submitting at once (exit 130). Exit 1 when a line did not succeed."""
    from producer.batch import RESULTS, BatchRun, InvalidFile

    with _api(url, key) as client:
        try:
            run = BatchRun(client, file, out, concurrency, retry=retry)
        except InvalidFile as exc:
            for problem in exc.problems:
                err.print(problem, soft_wrap=True, highlight=False, markup=False)
            raise fail(exc.message, 2) from None
        _render(run)
        summary = run.summary()
        results = out / RESULTS
        if as_json:
            typer.echo(json.dumps(_summary_json(run, summary, file, results)))
        line = _summary_line(run, summary, results)
        err.print(line, soft_wrap=True, highlight=False, markup=False)
        if run.error is not None:
            raise run.error  # the API went away or refused the key: _api says which
    if run.stopped:
        raise typer.Exit(INTERRUPTED)
    if not summary.complete:
        raise typer.Exit(1)


def _render(run: BatchRun) -> None:
    """``run.run()`` with a progress bar, stopped by the first Ctrl-C: a second one ends
    the process at once."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from producer.batch import LineResult

    pending = run.pending()
    total = len(run.requests)
    succeeded = run.summary().succeeded
    note = ""
    if retried := len(run.retried()):
        note = f" ({retried} that did not succeed before)"
    elif skipped := total - len(pending) - succeeded:
        note = f" (skipping {skipped} that did not succeed: --no-retry)"
    err.print(f"{succeeded} of {total} done already; rendering {len(pending)}{note}")
    columns = (TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err) as bar:
        task = bar.add_task("batch", total=total, completed=total - len(pending))

        def done(result: LineResult) -> None:
            if result.status != "succeeded":
                why = f": {result.error}" if result.error else ""
                bar.console.print(
                    f"line {result.line}: {result.status}{why}",
                    soft_wrap=True, highlight=False, markup=False,
                )  # fmt: skip
            bar.advance(task)

        def interrupted(signum: int, frame: FrameType | None) -> None:
            run.stop()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            bar.console.print("stopping: nothing more is submitted (Ctrl-C again to quit now)")

        previous = signal.signal(signal.SIGINT, interrupted)
        try:
            run.run(on_done=done)
        finally:
            signal.signal(signal.SIGINT, previous)


def _summary_line(run: BatchRun, summary: Summary, results: Path) -> str:
    counts = (
        f"{summary.succeeded} succeeded, {summary.failed} failed, {summary.canceled} canceled"
        f" of {summary.total} lines"
    )
    if summary.pending:
        counts += f", {summary.pending} left"
        if run.in_flight:
            counts += f" ({run.in_flight} in flight: the next run picks them up, charged once)"
    elif summary.failed + summary.canceled:
        counts += " (run again to retry them)" if run.retry else " (not retried: --no-retry)"
    prefix = "interrupted: " if run.stopped and run.error is None else ""
    return f"{prefix}{counts}; results in {results}"


def _summary_json(run: BatchRun, summary: Summary, file: Path, results: Path) -> dict[str, object]:
    return {
        "file": str(file),
        "results": str(results),
        "total": summary.total,
        "succeeded": summary.succeeded,
        "failed": summary.failed,
        "canceled": summary.canceled,
        "pending": summary.pending,
        "in_flight": run.in_flight,
        "interrupted": run.stopped and run.error is None,
        "error": None if run.error is None else run.error.message,
    }


@app.command()
def status(
    job_id: str, key: ApiKeyOpt, url: ApiUrl = DEFAULT_URL, as_json: JsonOpt = False
) -> None:
    """Show a job: its status, request, images and error; --json for the whole record."""
    with _api(url, key) as client:
        job = client.get(job_id)
    if as_json:
        typer.echo(job.model_dump_json(indent=2))
        return
    for label, value in _job_rows(job):
        typer.echo(f"{label:<9} {value}")


def _job_rows(job: JobView) -> list[tuple[str, str]]:
    """What ``sdq status`` shows of a job, label by label."""
    request = job.request
    if job.images:
        size = f"{job.images[0].width}x{job.images[0].height}"
    elif request.width and request.height:
        size = f"{request.width}x{request.height}"
    else:
        size = "the model's size"
    state = job.status.value
    if job.progress and job.status.value == "running":
        state += f" (step {job.progress['step']} of {job.progress['total']})"
    images = f"{request.num_images} image" + ("s" if request.num_images > 1 else "")
    rows = [
        ("id", job.id),
        ("status", state),
        ("tier", job.tier + (f" ({job.backend})" if job.backend else "")),
        ("prompt", request.prompt),
        ("render", f"{job.steps} steps, {size}, seed {job.seed}, {images}"),
        ("cost", f"{job.cost} credit{'s' if job.cost != 1 else ''}"
                 + (", refunded" if job.refunded else "")),
        ("created", _when(job.created_at)),
    ]  # fmt: skip
    if job.finished_at is not None:
        took = job.finished_at - job.created_at
        rows.append(("finished", f"{_when(job.finished_at)} ({took:.1f} s after submit)"))
    if job.error:
        rows.append(("error", job.error))
    for image in job.images:
        rows.append((f"image {image.index}", image.url or f"{image.key} (expired, deleted)"))
    return rows


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


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
    as_json: JsonOpt = False,
) -> None:
    """List your jobs, newest first: a table on a terminal, tab-separated lines otherwise
    (ids always whole)."""
    with _api(url, key) as client:
        page = client.jobs(status=status_filter, limit=limit)
    if as_json:
        typer.echo(page.model_dump_json(indent=2))
        return
    rows = [
        (
            job.id,
            job.tier,
            job.status.value,
            _when(job.created_at),
            " ".join(job.request.prompt.split()),
        )
        for job in page.jobs
    ]
    if not sys.stdout.isatty():
        for row in [JOB_COLUMNS, *rows]:
            typer.echo("\t".join(row))
        return
    Console().print(_jobs_table(rows))


#: The columns of ``sdq jobs``.
JOB_COLUMNS = ("id", "tier", "status", "created", "prompt")


def _jobs_table(rows: Sequence[tuple[str, ...]]) -> Table:
    """Ids, statuses and dates whole; only the prompt gives way to a narrow terminal."""
    from rich.table import Column, Table
    from rich.text import Text  # prompts are text, never markup

    whole = [
        Column(name, no_wrap=True, min_width=max([len(name), *(len(row[i]) for row in rows)]))
        for i, name in enumerate(JOB_COLUMNS[:4])
    ]
    table = Table(*whole, Column("prompt", overflow="fold"))
    for *cells, prompt in rows:
        shown = prompt if len(prompt) <= 80 else prompt[:79] + "…"
        table.add_row(*map(Text, cells), Text(shown))
    return table
