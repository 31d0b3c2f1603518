"""What every command group shares: the Typer apps, the console, the common options."""

from __future__ import annotations

import logging

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from common.settings import Settings, get_settings, refusals

app = typer.Typer(
    help="sdq: self-hosted Stable Diffusion XL rendering on Celery GPU workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(
    help="Manage API keys: over the admin API with --url and --token, else on the job store.",
    no_args_is_help=True,
)
models_app = typer.Typer(help="Build and inspect models.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")

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
