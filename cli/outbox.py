"""`pgqueue outbox`: the backlog per topic, and requeueing dead messages."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

outbox_app = typer.Typer(help="Outbox backlog per topic; requeue dead messages.")
console = Console()


def _common() -> Any:
    from pgqueue.cli import main

    return main


@outbox_app.command("status")
def status(
    dsn: Annotated[str | None, typer.Option("--dsn", help="PostgreSQL DSN.")] = None,
    schema: Annotated[str | None, typer.Option("--schema")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Per topic: pending, waiting behind their key, in flight, dead, oldest pending age."""
    main = _common()

    @main.friendly
    def run() -> None:
        from pgqueue import db
        from pgqueue.config import resolve_dsn, resolve_schema

        with db.connect(resolve_dsn(dsn), "cli") as conn:
            rows = db.run_sync(conn, db.queries(resolve_schema(schema))["outbox_status"], {})
        if json_output:
            typer.echo(json.dumps(rows))
            return
        table = Table(title="pgqueue outbox")
        columns = ("topic", "pending", "waiting", "in_flight", "dead", "oldest_pending_seconds")
        for column in columns:
            table.add_column(
                column.replace("_", " "), justify="left" if column == "topic" else "right"
            )
        for row in rows:
            table.add_row(
                *(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns)
            )
        if not rows:
            table.caption = "the outbox is empty"
        console.print(table)

    run()


@outbox_app.command("requeue")
def requeue(
    topic: Annotated[
        str | None, typer.Option("--topic", help="Only dead messages of this topic.")
    ] = None,
    ids: Annotated[
        list[int] | None, typer.Option("--id", help="Only these message rows (repeatable).")
    ] = None,
    all_messages: Annotated[bool, typer.Option("--all", help="Every dead message.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count, change nothing.")] = False,
    dsn: Annotated[str | None, typer.Option("--dsn", help="PostgreSQL DSN.")] = None,
    schema: Annotated[str | None, typer.Option("--schema")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Send dead messages back to the outbox with the same message ids."""
    main = _common()
    if topic is None and not ids and not all_messages:
        raise typer.BadParameter("choose what to requeue: --topic, --id or --all")

    @main.friendly
    def run() -> None:
        from pgqueue import db
        from pgqueue.config import resolve_dsn, resolve_schema
        from pgqueue.names import topic_name
        from pgqueue.outbox import outbox_channel

        params = {"topic": None if topic is None else topic_name(topic), "ids": ids or None}
        resolved = resolve_schema(schema)
        queries = db.queries(resolved)
        with db.connect(resolve_dsn(dsn), "cli", autocommit=False) as conn:
            db.run_sync(conn, queries["lock_requeued_message_keys"], params)
            rows = db.run_sync(conn, queries["requeue_dead_messages"], params)
            if dry_run:
                conn.rollback()
            else:
                # Wake the relays now rather than at their next poll.
                db.run_sync(conn, queries["notify_outbox"], {"channel": outbox_channel(resolved)})
                conn.commit()
        verb = "would requeue" if dry_run else "requeued"
        if json_output:
            typer.echo(json.dumps({"requeued": len(rows), "dry_run": dry_run}))
        else:
            typer.echo(f"{verb} {len(rows)} dead message(s)")

    run()
