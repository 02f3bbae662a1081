"""`pgqueue queues`: list, pause, resume and limit queues.

Settings live in the database (``pgqueue.queues``), so every worker obeys a change at its next
claim; nothing needs restarting.

    pgqueue queues list [--json]
    pgqueue queues pause billing
    pgqueue queues resume billing
    pgqueue queues set billing --concurrency 3 --rate 50 --per 1 --max-depth 10000
    pgqueue queues set billing --no-rate-limit
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from pgqueue.config import resolve_dsn

# Defined before importing cli.main: main imports this module at its end, and under
# `python -m pgqueue.cli.main` that import runs main a second time, which needs queues_app.
queues_app = typer.Typer(
    help="List queues and change their settings (pause, limits).", no_args_is_help=True
)

from pgqueue.cli.main import (  # noqa: E402
    DsnOption,
    JsonOption,
    SchemaOption,
    console,
    friendly,
)

if TYPE_CHECKING:
    from pgqueue.queues import QueueSettings

NameArgument = Annotated[
    str, typer.Argument(metavar="NAME", help="Queue name.", show_default=False)
]


def _rate(settings: QueueSettings) -> str | None:
    if settings.rate_limit is None or settings.rate_interval_seconds is None:
        return None
    return f"{settings.rate_limit}/{settings.rate_interval_seconds:g}s"


def _as_dict(settings: QueueSettings) -> dict[str, Any]:
    return {
        "name": settings.name,
        "paused": settings.is_paused,
        "concurrency_limit": settings.concurrency_limit,
        "rate_limit": settings.rate_limit,
        "rate_interval_seconds": settings.rate_interval_seconds,
        "rate": _rate(settings),
        "max_depth": settings.max_depth,
    }


def _describe(settings: QueueSettings) -> str:
    """One line: `billing: paused, concurrency 3, rate 50/1s, max depth none`."""

    def limit(value: object) -> str:
        return "none" if value is None else str(value)

    return (
        f"{settings.name}: {'paused' if settings.is_paused else 'running'}, "
        f"concurrency {limit(settings.concurrency_limit)}, rate {limit(_rate(settings))}, "
        f"max depth {limit(settings.max_depth)}"
    )


def _known(conn: Any, name: str, schema: str | None) -> bool:
    from pgqueue.queues import list_queues

    return any(q.name == name for q in list_queues(conn, schema=schema))


def _change(
    dsn: str | None,
    schema: str | None,
    name: str,
    json_output: bool,
    verb: str,
    **changes: Any,
) -> None:
    """Apply ``changes`` to one queue in one transaction and report the new settings."""
    from pgqueue import db
    from pgqueue.names import queue_name
    from pgqueue.queues import configure_queue

    name = queue_name(name)  # a bad name is reported before any connection
    with db.connect(resolve_dsn(dsn), "cli", autocommit=False) as conn:
        existed = _known(conn, name, schema)
        settings = configure_queue(conn, name, schema=schema, **changes)
        conn.commit()
    if json_output:
        typer.echo(json.dumps({**_as_dict(settings), "created": not existed}))
        return
    typer.echo(f"{verb} {_describe(settings)}")
    if not existed:
        typer.echo(
            f"note: queue {settings.name!r} had no settings yet; they are stored now and "
            "apply as soon as jobs or workers use it",
            err=True,
        )


@queues_app.command("list")
@friendly
def list_command(
    dsn: DsnOption = None, schema: SchemaOption = None, json_output: JsonOption = False
) -> None:
    """Every known queue and its settings: paused, concurrency limit, rate limit, max depth."""
    from pgqueue import db
    from pgqueue.queues import list_queues

    with db.connect(resolve_dsn(dsn), "cli", autocommit=False) as conn:
        queues = list_queues(conn, schema=schema)
        conn.commit()
    if json_output:
        typer.echo(json.dumps([_as_dict(q) for q in queues]))
        return
    table = Table(title="pgqueue queues")
    table.add_column("queue")
    for column in ("paused", "concurrency limit", "rate limit", "max depth"):
        table.add_column(column, justify="right")
    for q in queues:
        table.add_row(
            q.name,
            "yes" if q.is_paused else "no",
            "-" if q.concurrency_limit is None else str(q.concurrency_limit),
            _rate(q) or "-",
            "-" if q.max_depth is None else str(q.max_depth),
        )
    if not queues:
        table.caption = "no queues yet"
    console.print(table)


@queues_app.command("pause")
@friendly
def pause_command(
    name: NameArgument,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
) -> None:
    """Stop every worker from claiming jobs of NAME; enqueue keeps working, running jobs finish."""
    _change(dsn, schema, name, json_output, "paused", is_paused=True)


@queues_app.command("resume")
@friendly
def resume_command(
    name: NameArgument,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
) -> None:
    """Let workers claim jobs of NAME again."""
    _change(dsn, schema, name, json_output, "resumed", is_paused=False)


@queues_app.command("set")
@friendly
def set_command(
    name: NameArgument,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, help="Most jobs of the queue running at once, across all workers."),
    ] = None,
    no_concurrency_limit: Annotated[
        bool, typer.Option("--no-concurrency-limit", help="Remove the concurrency limit.")
    ] = False,
    rate: Annotated[
        int | None,
        typer.Option(min=1, help="Most job starts per --per seconds, across all workers."),
    ] = None,
    per: Annotated[
        float | None,
        typer.Option(min=0, help="The rate limit's interval in seconds (default 1)."),
    ] = None,
    no_rate_limit: Annotated[
        bool, typer.Option("--no-rate-limit", help="Remove the rate limit.")
    ] = False,
    max_depth: Annotated[
        int | None,
        typer.Option(min=1, help="Most waiting jobs; enqueue beyond it raises QueueFull."),
    ] = None,
    no_max_depth: Annotated[
        bool, typer.Option("--no-max-depth", help="Remove the maximum depth.")
    ] = False,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
) -> None:
    """Change NAME's limits; limits not mentioned keep their value."""
    changes: dict[str, Any] = {}
    if concurrency is not None and no_concurrency_limit:
        raise typer.BadParameter(
            "give --concurrency or --no-concurrency-limit, not both", param_hint="--concurrency"
        )
    if concurrency is not None or no_concurrency_limit:
        changes["concurrency_limit"] = concurrency
    if rate is not None and no_rate_limit:
        raise typer.BadParameter("give --rate or --no-rate-limit, not both", param_hint="--rate")
    if per is not None and rate is None:
        raise typer.BadParameter(
            "--per needs --rate (jobs per that many seconds)", param_hint="--per"
        )
    if per is not None and not per > 0:
        raise typer.BadParameter("must be a positive number of seconds", param_hint="--per")
    if rate is not None:
        changes["rate_limit"] = (rate, 1.0 if per is None else per)
    elif no_rate_limit:
        changes["rate_limit"] = None
    if max_depth is not None and no_max_depth:
        raise typer.BadParameter(
            "give --max-depth or --no-max-depth, not both", param_hint="--max-depth"
        )
    if max_depth is not None or no_max_depth:
        changes["max_depth"] = max_depth
    if not changes:
        raise typer.BadParameter(
            "nothing to change: give --concurrency, --rate (with --per), --max-depth, "
            "or a --no-... option to remove a limit"
        )
    _change(dsn, schema, name, json_output, "set", **changes)
