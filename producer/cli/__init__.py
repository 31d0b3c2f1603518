"""The ``sdq`` command line: one Typer app, its commands grouped by who runs them."""

# isort: skip_file
# `--help` lists commands in the order their modules register them: stack, client, processes.
from producer.cli.base import app, models_app
from producer.cli import stack, jobs, services, admin

# The one place producer reaches into workers: the sdq entry point composes their commands.
from workers import cli as workers_cli

app.command()(workers_cli.worker)
app.command()(workers_cli.flower)
models_app.command("build-tiny")(workers_cli.build_tiny)

__all__ = ["admin", "app", "jobs", "services", "stack"]
