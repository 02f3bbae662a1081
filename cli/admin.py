"""`pgqueue workers`, `prune`, `roles` and `audit`: the administrator's commands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from enum import Enum
from typing import Annotated, Any

import typer
from pgqueue.cli.operations import (
    DsnOption,
    JsonOption,
    LimitOption,
    SchemaOption,
    emit_json,
    friendly,
    print_table,
    progress_console,
    run_query,
    session,
)

# Transition tables allow one event per trigger, hence three statement-level triggers.
JOB_EVENT_TRIGGERS = {
    "jobs_record_events_insert": (
        "CREATE TRIGGER {trigger} AFTER INSERT ON {schema}.jobs"
        " REFERENCING NEW TABLE AS new_rows"
        " FOR EACH STATEMENT EXECUTE FUNCTION {schema}.record_job_events()"
    ),
    "jobs_record_events_update": (
        "CREATE TRIGGER {trigger} AFTER UPDATE ON {schema}.jobs"
        " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
        " FOR EACH STATEMENT EXECUTE FUNCTION {schema}.record_job_events()"
    ),
    "jobs_record_events_delete": (
        "CREATE TRIGGER {trigger} AFTER DELETE ON {schema}.jobs"
        " REFERENCING OLD TABLE AS old_rows"
        " FOR EACH STATEMENT EXECUTE FUNCTION {schema}.record_job_events()"
    ),
}


class Switch(str, Enum):
    on = "on"
    off = "off"


# ---------------------------------------------------------------- workers and prune


@friendly
def workers_command(
    dsn: DsnOption = None, schema: SchemaOption = None, json_output: JsonOption = False
) -> None:
    """Registered workers and relays: host, pid, queues, last heartbeat, alive or not."""
    with session(dsn) as conn:
        rows = run_query(conn, schema, "list_workers", {})
    if json_output:
        emit_json(rows)
        return
    columns = ("kind", "host", "pid", "queues", "concurrency", "started_at",
               "seconds_since_heartbeat", "is_alive")  # fmt: skip
    print_table("pgqueue workers", rows, columns, "no worker or relay has registered")


@friendly
def prune_command(
    dead_days: Annotated[
        float, typer.Option(min=0, help="Delete dead letters (jobs and messages) older than this.")
    ] = 30,
    delivered_days: Annotated[
        float, typer.Option(min=0, help="Delete delivered outbox history older than this.")
    ] = 1,
    events_days: Annotated[
        float, typer.Option(min=0, help="Delete job events older than this.")
    ] = 7,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
) -> None:
    """Delete old history in small batches, each committed on its own (no long locks)."""
    from dataclasses import asdict

    from pgqueue import operations

    with (
        session(dsn, autocommit=True) as conn,
        progress_console.status("pruning old history…", spinner="dots")
        if not json_output
        else _nothing(),
    ):
        result = operations.prune(
            conn,
            dead_older_than=timedelta(days=dead_days),
            delivered_older_than=timedelta(days=delivered_days),
            events_older_than=timedelta(days=events_days),
            schema=schema,
        )
    counts = asdict(result)
    if json_output:
        emit_json(counts)
        return
    typer.echo(
        "pruned " + ", ".join(f"{count} {name.replace('_', ' ')}" for name, count in counts.items())
    )


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# ---------------------------------------------------------------- roles

roles_app = typer.Typer(
    help="Least-privilege roles: print the grants (--sql) or run them (apply).",
    invoke_without_command=True,
)
PrefixOption = Annotated[
    str | None,
    typer.Option("--prefix", help="Role names are <prefix>_producer etc.; default the schema."),
]


def grants(schema: str | None, prefix: str | None) -> tuple[str, Any]:
    from pgqueue.config import resolve_schema
    from pgqueue.roles import RoleNames, grants_sql

    resolved = resolve_schema(schema)
    names = RoleNames.for_schema(resolved, prefix)
    return grants_sql(resolved, names), names


@roles_app.callback()
@friendly
def roles(
    ctx: typer.Context,
    sql: Annotated[bool, typer.Option("--sql", help="Print the grants for review.")] = False,
    schema: SchemaOption = None,
    prefix: PrefixOption = None,
) -> None:
    """Producer (enqueue/publish only), worker, relay and reader (views only)."""
    if ctx.invoked_subcommand is not None:
        return
    if not sql:
        raise typer.BadParameter("use --sql to print the grants, or `pgqueue roles apply`")
    typer.echo(grants(schema, prefix)[0], nl=False)


@roles_app.command("apply")
@friendly
def roles_apply(
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    prefix: PrefixOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create the four roles (NOLOGIN) and grant them; run as the schema owner. Idempotent."""
    from dataclasses import asdict

    from pgqueue import db, operations

    text, names = grants(schema, prefix)
    with session(dsn) as conn:
        try:
            conn.execute(text)
        except Exception as exc:
            raise db.translate_error(exc) from None
        operations.record(conn, "roles.apply", "roles", 4, asdict(names), schema=schema)
        conn.commit()
    if json_output:
        emit_json({"applied": True, "roles": asdict(names)})
        return
    typer.echo("granted: " + ", ".join(f"{kind} {role}" for kind, role in asdict(names).items()))
    typer.echo("the roles cannot log in: GRANT them to your login roles", err=True)


# ---------------------------------------------------------------- audit

audit_app = typer.Typer(
    help="The audit trail of operator actions; per-job event history on or off.",
    invoke_without_command=True,
)


@audit_app.callback()
@friendly
def audit(
    ctx: typer.Context,
    limit: LimitOption = 50,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
) -> None:
    """The newest operator actions: who (database role), what, how many, when."""
    if ctx.invoked_subcommand is not None:
        return
    with session(dsn) as conn:
        rows = run_query(conn, schema, "audit_trail", {"limit": limit})
    if json_output:
        emit_json(rows)
        return
    columns = ("id", "at", "role", "action", "target", "count", "details")
    print_table("pgqueue audit trail", rows, columns, "no operator action recorded yet")


def job_events_enabled(conn: Any, schema: str | None) -> bool:
    from pgqueue.config import resolve_schema

    resolved = resolve_schema(schema)
    row = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s)"
        " AND tgfoid = to_regprocedure(%s)",
        (f'"{resolved}".jobs', f'"{resolved}".record_job_events()'),
    ).fetchone()
    return bool(row and row[0] == len(JOB_EVENT_TRIGGERS))


def switch_job_events(conn: Any, schema: str | None, on: bool) -> None:
    """Attach (or drop) the statement-level triggers that fill ``job_events``.

    Needs the owner of the jobs table; takes a short lock on it that waits for running
    claims and blocks new ones until the transaction ends.
    """
    from psycopg import sql

    from pgqueue.config import resolve_schema

    s = sql.Identifier(resolve_schema(schema))
    for name, create in JOB_EVENT_TRIGGERS.items():
        trigger = sql.Identifier(name)
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}.jobs").format(trigger, s))
        if on:
            conn.execute(sql.SQL(create).format(trigger=trigger, schema=s))


@audit_app.command("job-events")
@friendly
def audit_job_events(
    switch: Annotated[
        Switch | None,
        typer.Argument(help="on: record every job state change; off: stop. Omit to show."),
    ] = None,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
) -> None:
    """Record every job's state changes in job_events (enqueued, claimed, retried, ...).

    Costs one extra INSERT per statement that changes jobs; see docs/operations.md.
    """
    from pgqueue import db, operations

    with session(dsn) as conn:
        if switch is not None:
            try:
                switch_job_events(conn, schema, switch is Switch.on)
            except Exception as exc:
                raise db.translate_error(exc) from None
            operations.record(
                conn, f"audit.job_events.{switch.value}", "jobs", 1, {}, schema=schema
            )
        is_on = job_events_enabled(conn, schema)
        conn.commit()
    if json_output:
        emit_json({"job_events": "on" if is_on else "off"})
    else:
        typer.echo(f"job events are {'on' if is_on else 'off'}")


def register_admin(app: typer.Typer) -> None:
    """Add the administrator's commands to the root ``pgqueue`` app."""
    app.command("workers")(workers_command)
    app.command("prune")(prune_command)
    app.add_typer(roles_app, name="roles")
    app.add_typer(audit_app, name="audit")
