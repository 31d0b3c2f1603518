"""What the command lines of both sides share (``producer.cli`` and ``workers.cli``): the
console, one-line failures, logging, and settings checked with their refusals named."""

from __future__ import annotations

import logging

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from common.settings import Settings, get_settings, refusals

err = Console(stderr=True)


def setup_logging(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
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


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def checked_settings() -> Settings:
    """The settings, or exit 2 with one line per refusal (each names its setting), no
    traceback: what a process that serves prints when production refuses its settings."""
    try:
        return get_settings()
    except ValidationError as exc:
        for line in refusals(exc):
            err.print(f"[red]error:[/red] {escape(line)}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
