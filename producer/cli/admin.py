"""Operator commands: `sdq keys ...` (over the admin API, or on the store directly) and
`sdq models ...`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from common.settings import get_settings
from producer.cli.base import err, fail, keys_app

if TYPE_CHECKING:
    from producer.keyops import Json, KeyOps

UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="SDQ_API_URL",
        help="The sdq API: with the admin token, work over its admin API; else on the store.",
        show_default=False,
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="SDQ_ADMIN_TOKEN",
        help="The admin API's token (SDQ_ADMIN_TOKEN); with --url, work over the admin API.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead.")]
KeyArg = Annotated[str, typer.Argument(help="The key itself, or its id (key_...).")]
RateOpt = Annotated[
    float | None,
    typer.Option(
        min=0.01,
        help="Requests a second, in bursts of as many; default SDQ_DEFAULT_RATE_PER_SECOND.",
    ),
]
MaxJobsOpt = Annotated[
    int | None,
    typer.Option(min=1, help="Jobs queued or running at once; default SDQ_DEFAULT_MAX_JOBS."),
]
MaxPriorityOpt = Annotated[
    int | None,
    typer.Option(
        min=0, max=9, help="Higher priorities are capped to this; default SDQ_DEFAULT_MAX_PRIORITY."
    ),
]
ModelsOpt = Annotated[
    str | None,
    typer.Option(
        help="Models beyond each tier's default it may ask for, comma-separated "
        "(e.g. sd15,sd21: available upon request).",
        show_default=False,
    ),
]


def _models(value: str) -> list[str]:
    """Entitlements as a list, each checked against the models file here (the admin API
    checks them against its own)."""
    from common.errors import InvalidRequest
    from common.models import load_models

    entitled = list(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    try:
        known = load_models(get_settings().models_file)
        for model in entitled:
            known.get(model)
    except InvalidRequest as exc:
        raise fail(f"--models: {exc.message}") from None
    return entitled


@contextmanager
def _ops(url: str | None, token: str | None) -> Iterator[KeyOps]:
    """The admin API when both its URL and token are given, else the store; every error
    ends the command in one line with status 1 (2 for a malformed URL)."""
    import redis

    from common.errors import SdqError
    from producer.client import ApiError, InvalidUrlError, UnreachableError
    from producer.keyops import ApiOps, StoreOps

    settings = get_settings()
    try:
        if url and token:
            api = ApiOps(url, token)
            try:
                yield api
            finally:
                api.close()
            return
        from common.apikeys import KeyStore
        from common.redis import connect

        keys = KeyStore(connect(settings.redis_url), settings.default_rate_per_second)
        yield StoreOps(
            keys,
            free_credits=settings.free_credits,
            overlap_seconds=settings.webhook_secret_overlap_seconds,
        )
    except InvalidUrlError as exc:
        raise fail(exc.message, 2) from None
    except ApiError as exc:
        raise fail(f"{exc.status_code}: {exc.message}") from None
    except UnreachableError as exc:
        raise fail(f"{exc.message} (check --url or SDQ_API_URL)") from None
    except SdqError as exc:
        raise fail(exc.message) from None
    except redis.RedisError as exc:
        raise fail(f"cannot reach the job store at {settings.redis_url}: {exc}") from None


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _state(key: Json) -> str:
    return "revoked" if key["revoked"] else "disabled" if key["disabled"] else "active"


def _limit(value: Any) -> str:
    return "default" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _print_keys(keys: list[Json]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "name", "credits", "rate", "max jobs", "max prio", "models", "state")
    for key in keys:
        table.add_row(
            key["id"],
            key["name"] or "-",
            str(key["credits"]),
            _limit(key["rate"]),
            _limit(key["max_jobs"]),
            _limit(key["max_priority"]),
            ",".join(key["models"]) or "-",
            _state(key),
        )
    Console().print(table)


def _print_key(key: Json) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("field", "value", show_header=False)
    rows = {
        "id": key["id"],
        "name": key["name"] or "-",
        "state": _state(key),
        "credits": str(key["credits"]),
        "rate": _limit(key["rate"]),
        "max jobs": _limit(key["max_jobs"]),
        "max priority": _limit(key["max_priority"]),
        "models": ",".join(key["models"]) or "-",
        "active jobs": str(key["active_jobs"]),
        "created": _when(key["created_at"]),
        "secret rotated": _when(key["webhook_secret_rotated_at"]),
        "previous secret until": _when(key["previous_secret_expires_at"]),
    }
    for name, value in rows.items():
        table.add_row(name, value)
    Console().print(table)


@keys_app.command("create")
def keys_create(
    credits: Annotated[
        int | None,
        typer.Option(min=0, help="Credits the key starts with; default SDQ_FREE_CREDITS."),
    ] = None,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    rate: RateOpt = None,
    max_jobs: MaxJobsOpt = None,
    max_priority: MaxPriorityOpt = None,
    models: ModelsOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key. Prints only the key on stdout, so scripts can capture it."""
    fields: Json = {"credits": credits, "name": name, "models": _models(models or "")}
    limits = {"rate": rate, "max_jobs": max_jobs, "max_priority": max_priority}
    fields |= {field: value for field, value in limits.items() if value is not None}
    with _ops(url, token) as ops:
        created = ops.create(fields)
    if as_json:
        _print_json(created)
        return
    extra = f", entitled to {', '.join(created['models'])}" if created["models"] else ""
    err.print(f"created {created['id']} with {created['credits']} credits{extra}")
    typer.echo(created["key"])


@keys_app.command("list")
def keys_list(
    limit: Annotated[int, typer.Option(min=1, max=200, help="Keys per page.")] = 50,
    cursor: Annotated[
        str | None, typer.Option(help="Where a page ended (its next_cursor).", show_default=False)
    ] = None,
    all_pages: Annotated[bool, typer.Option("--all", help="Every page, not just one.")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the keys, newest first: credits, limits, entitlements and state."""
    keys: list[Json] = []
    with _ops(url, token) as ops:
        while True:
            page = ops.page(limit, cursor)
            keys += page["keys"]
            cursor = page["next_cursor"]
            if not all_pages or cursor is None:
                break
    if as_json:
        _print_json({"keys": keys, "next_cursor": cursor})
        return
    _print_keys(keys)
    if cursor is not None:
        err.print(f"more keys: --cursor {cursor} (or --all)", highlight=False)


@keys_app.command("show")
def keys_show(
    key_or_id: KeyArg, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Show a key: its credits, limits, entitlements, state and webhook secret rotation."""
    with _ops(url, token) as ops:
        key = ops.show(key_or_id)
    if as_json:
        _print_json(key)
    else:
        _print_key(key)


@keys_app.command("topup")
def keys_topup(
    key_or_id: KeyArg,
    credits: Annotated[
        int, typer.Argument(help="Credits to add (an atomic increment); negative takes back.")
    ],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add credits to a key, atomically: concurrent top-ups all count."""
    if credits == 0:
        raise fail("nothing to add: give a number of credits other than 0", 2)
    with _ops(url, token) as ops:
        key = ops.update(key_or_id, {"add_credits": credits})
    if as_json:
        _print_json(key)
        return
    typer.echo(f"{key['id']}: {key['credits']} credits ({credits:+d})")


@keys_app.command("set")
def keys_set(
    key_or_id: KeyArg,
    name: Annotated[str | None, typer.Option(help="A label.", show_default=False)] = None,
    rate: RateOpt = None,
    max_jobs: MaxJobsOpt = None,
    max_priority: MaxPriorityOpt = None,
    models: ModelsOpt = None,
    disabled: Annotated[
        bool | None,
        typer.Option(
            "--disable/--enable",
            help="Refuse the key (403) until enabled again; unlike revoke, reversible.",
            show_default=False,
        ),
    ] = None,
    reset: Annotated[
        list[str] | None,
        typer.Option(
            help="Give a limit back its default: rate, max_jobs or max_priority (repeatable).",
            show_default=False,
        ),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a key's limits, entitlements, name, or disable or enable it."""
    changes: Json = {}
    for field in reset or []:
        if field.replace("-", "_") not in ("rate", "max_jobs", "max_priority"):
            raise fail(f"--reset {field}: choose rate, max_jobs or max_priority", 2)
        changes[field.replace("-", "_")] = None
    given: Json = {"name": name, "rate": rate, "max_jobs": max_jobs, "max_priority": max_priority}
    given |= {"disabled": disabled, "models": None if models is None else _models(models)}
    changes |= {field: value for field, value in given.items() if value is not None}
    if not changes:
        raise fail(
            "nothing to change: give --name, --rate, --max-jobs, --max-priority, "
            "--models, --disable/--enable or --reset",
            2,
        )
    with _ops(url, token) as ops:
        key = ops.update(key_or_id, changes)
    if as_json:
        _print_json(key)
    else:
        _print_key(key)


@keys_app.command("rotate-secret")
def keys_rotate_secret(
    key_or_id: KeyArg,
    overlap: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=30 * 86400,
            help="Seconds the old secret signs too; default SDQ_WEBHOOK_SECRET_OVERLAP_SECONDS.",
            show_default=False,
        ),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give a key a new webhook signing secret; prints only the new secret on stdout. The old
    one signs too until the overlap ends, so receivers switch without losing a delivery."""
    with _ops(url, token) as ops:
        rotated = ops.rotate(key_or_id, overlap)
    if as_json:
        _print_json(rotated)
        return
    until = rotated["previous_secret_expires_at"]
    tail = f"the old one signs too until {_when(until)}" if until else "the old one no longer signs"
    err.print(f"rotated the webhook secret of {rotated['id']}; {tail}", highlight=False)
    typer.echo(rotated["webhook_secret"])


@keys_app.command("revoke")
def keys_revoke(
    key_or_id: KeyArg, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Revoke a key: every API process answers it 403 from its next request on."""
    with _ops(url, token) as ops:
        key = ops.revoke(key_or_id)
    if as_json:
        _print_json(key)
        return
    err.print(f"revoked {key['id']}")
