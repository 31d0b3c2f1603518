"""What every command group shares: the Typer apps, the console, the common options."""

from __future__ import annotations

import typer

from common.cli import checked_settings, err, fail, setup_logging

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


__all__ = ["app", "checked_settings", "err", "fail", "keys_app", "models_app", "setup_logging"]
