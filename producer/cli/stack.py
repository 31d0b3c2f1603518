"""The local stack: `sdq up`, `sdq ps` and `sdq down`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from producer.cli.base import app, err, fail, setup_logging

if TYPE_CHECKING:
    from common.settings import Settings
    from producer.stack import Stack


@app.command()
def up(
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            "-d",
            help="Return once every service is healthy; a supervisor of its own keeps them up.",
        ),
    ] = False,
    credits: Annotated[int, typer.Option(help="Credits of the API key it prints.")] = 1000,
    report_fd: Annotated[
        int | None, typer.Option(hidden=True, help="Internal: the detached supervisor's pipe.")
    ] = None,
) -> None:
    """Start the whole local stack (Valkey, SeaweedFS S3, the API, a worker per tier, Flower)
    and keep it up: a process that dies is restarted, with a backoff."""
    from producer.preflight import check, load_settings, notes
    from producer.stack import Stack, StackError
    from producer.supervisor import Supervisor, refuse_if_running, serve_detached

    try:
        settings = load_settings()
    except StackError as exc:
        raise fail(str(exc)) from None
    setup_logging(settings)
    stack = Stack(settings)
    if report_fd is not None:  # the detached supervisor, started below by `sdq up --detach`
        raise typer.Exit(serve_detached(Supervisor(stack), report_fd))
    try:
        refuse_if_running(stack)
        check(settings)
    except StackError as exc:
        raise fail(str(exc)) from None
    for note in notes(settings):
        err.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True, highlight=False)
    _build_tiny_model(settings)
    started_at = time.monotonic()
    if detach:
        pid = _start_detached(stack)
        _announce(stack, settings, credits, time.monotonic() - started_at)
        err.print(
            f"detached: supervisor pid {pid} restarts what dies (log {stack.logs / 'stack.log'}); "
            "`sdq ps` shows it, `sdq down` stops it",
            soft_wrap=True,
        )
        return
    supervisor = Supervisor(stack)
    _log_to_file(stack)
    supervisor.claim()
    try:
        supervisor.start(on_ready=_ready)
    except StackError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        err.print("stopped")
        raise typer.Exit(130) from None
    failed: typer.Exit | None = None
    try:
        _announce(stack, settings, credits, time.monotonic() - started_at)
        err.print("press Ctrl-C to stop; a process that dies is restarted")
    except KeyboardInterrupt:
        supervisor.stopping = True  # run() stops what started
    except typer.Exit as exc:
        supervisor.stopping, failed = True, exc
    supervisor.run()
    err.print("stopped")
    if failed is not None:
        raise failed


def _ready(name: str) -> None:
    err.print(f"[green]ready[/green] {name}")


def _build_tiny_model(settings: Settings) -> None:
    """Build the tiny pipeline of each model that would load one (no source of its own),
    side by side: each build is mostly one process importing torch."""
    from common.models import load_models

    builds = []
    for model in load_models(settings.models_file):
        directory = settings.tiny_dir(model.family)
        if settings.model_source(model) != str(directory):
            continue
        if (directory / "model_index.json").exists():
            continue
        err.print(f"building the tiny {model.family} model in {directory} ...")
        build = [sys.executable, "-m", "producer.cli", "models", "build-tiny"]
        # Its stdout is a line for scripts (the model's path as JSON); not for this terminal.
        builds.append(
            subprocess.Popen(
                [*build, str(directory), "--family", model.family], stdout=subprocess.DEVNULL
            )
        )
    failed = [done.returncode for done in builds if done.wait() != 0]
    if failed:
        raise fail(f"building the tiny model failed (status {failed[0]})")


def _log_to_file(stack: Stack) -> None:
    """The supervisor's lines (restarts) go to the stack's log as well as the terminal."""
    stack.logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(stack.logs / "stack.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("producer.supervisor", "producer.stack"):
        logging.getLogger(name).addHandler(handler)


def _start_detached(stack: Stack) -> int:
    """Start the supervisor in a session of its own and relay its progress; its pid."""
    from producer.supervisor import launch_detached

    argv = [sys.executable, "-m", "producer.cli", "up"]
    env = {**os.environ, "SDQ_HOME": str(stack.home)}
    try:
        last = launch_detached(argv, env, stack.logs / "stack.log", _ready)
    except KeyboardInterrupt:
        err.print("stopped")
        raise typer.Exit(130) from None
    if "up" in last:
        return int(last["up"])
    if "error" in last:
        raise fail(last["error"])
    tail = "\n".join(stack.tail("stack").splitlines()[-10:])
    raise fail(
        f"the supervisor exited with status {last.get('exited')}; stack.log ends with:\n{tail}"
    )


def _announce(stack: Stack, settings: Settings, credits: int, seconds: float) -> None:
    from common.apikeys import KeyStore
    from common.redis import connect
    from common.tiers import load_tiers
    from producer.stack import cores, thread_share, worker_plan

    try:
        key, _ = KeyStore(connect(settings.redis_url)).create(credits, name="sdq up")
    except Exception as exc:
        raise fail(f"the stack is up, but creating its API key failed: {exc}") from None
    api = stack.api_url
    workers = len(worker_plan(load_tiers(settings.tiers_file)))
    share = thread_share(settings, workers)
    if share is not None:
        threads = f"{share} per CPU worker ({cores()} cores, {workers} workers)"
    elif settings.torch_threads is not None:
        threads = f"{settings.torch_threads} per worker (SDQ_TORCH_THREADS)"
    else:
        threads = "torch's default (GPU workers)"
    err.print(
        f"\n[bold]sdq is up[/bold] in {seconds:.1f}s\n"
        f"  API      {api}  (docs {api}/docs)\n"
        f"  Flower   {stack.flower_url}\n"
        f"  S3       {settings.s3_endpoint_url}  bucket {settings.s3_bucket}\n"
        f"  Redis    {settings.redis_url}\n"
        f"  threads  {threads}\n"
        f"  home     {stack.home}  (logs in {stack.logs})\n"
        f"  API key  {key}  ({credits} credits)\n\n"
        f"  export SDQ_API_URL={api} SDQ_API_KEY={key}\n\n"
        f"  curl -H 'Authorization: {key}' -F 'inputText=An astronaut riding a horse on Mars' \\\n"
        f"       -F 'guidanceScale=10' -o astronaut_on_mars.jpg {api}/stable-diffusion-normal\n",
        soft_wrap=True,
        highlight=False,
    )


@app.command()
def ps(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Each process of the local stack: its pid, state, restarts, uptime and address."""
    from producer.supervisor import status

    found = status(_running_stack())
    if as_json:
        typer.echo(json.dumps(found.as_json()))
        return
    if found.supervisor_state is None and not found.processes:
        err.print(f"no stack is running (home {found.home})")
        return
    up = f", up {_duration(found.uptime_seconds)}" if found.uptime_seconds is not None else ""
    typer.echo(f"supervisor {found.supervisor_pid} {found.supervisor_state}{up}  home {found.home}")
    rows = [("NAME", "PID", "STATE", "RESTARTS", "UPTIME", "ADDRESS")]
    rows += [
        (p.name, str(p.pid or "-"), p.state, str(p.restarts), _duration(p.uptime_seconds), p.url)
        for p in found.processes
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        typer.echo(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        )


def _running_stack() -> Stack:
    """The stack as far as ``ps`` and ``down`` need it (its home and recorded state): the
    production checks are for starting one, and must not keep a running stack from stopping
    (a compose ``.env`` says ``SDQ_ENV=production``)."""
    from pydantic import ValidationError

    from common.settings import Settings
    from producer.preflight import load_settings
    from producer.stack import Stack, StackError

    try:
        try:
            return Stack(Settings.unchecked())
        except ValidationError:
            return Stack(load_settings())  # names each invalid setting
    except StackError as exc:
        raise fail(str(exc)) from None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


@app.command()
def down() -> None:
    """Stop the local stack (its supervisor and every process), from any folder of the
    checkout."""
    from producer.supervisor import stop_stack

    stack = _running_stack()
    stopped = stop_stack(stack)
    err.print(
        f"stopped: {', '.join(stopped)}" if stopped else f"no stack is running (home {stack.home})",
        soft_wrap=True,
    )
