"""The ``sdq`` command line: one Typer app, its commands grouped by who runs them."""

# isort: skip_file
# `--help` lists commands in the order their modules register them: stack, client, processes.
from producer.cli.base import app
from producer.cli import stack, jobs, services, admin

__all__ = ["admin", "app", "jobs", "services", "stack"]
