"""Operator commands: jobs, dead letters, workers, pruning, roles and the audit trail.

    pgqueue jobs list [--queue Q] [--task T] [--state available|running|waiting] [--limit N]
    pgqueue jobs show ID | jobs retry ID | jobs cancel ID... [--reason TEXT]
    pgqueue dlq list [--queue Q] [--task T] [--error TEXT] [--older-than-days N] [--limit N]
    pgqueue dlq requeue|purge [filters | --all] [--dry-run] [--yes]
    pgqueue workers
    pgqueue prune [--dead-days 30] [--delivered-days 1] [--events-days 7]
    pgqueue roles --sql | pgqueue roles apply
    pgqueue audit [--limit N] | pgqueue audit job-events [on|off]

Every command takes --dsn, --schema and --json; exit codes are those of ``pgqueue.cli.main``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import Enum
from functools import wraps
from typing import Annotated, Any, TypeVar
from uuid import UUID

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

# cli.main imports this module at its end; importing it back at module level would run it
# twice under `python -m pgqueue.cli.main`, so its helpers are looked up when a command runs.
console = Console()
progress_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

DsnOption = Annotated[
    str | None,
    typer.Option("--dsn", help="PostgreSQL DSN; default $PGQUEUE_DSN, then $DATABASE_URL."),
]
SchemaOption = Annotated[
    str | None,
    typer.Option(
        "--schema", help="Schema of pgqueue's tables; default $PGQUEUE_SCHEMA or pgqueue."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
LimitOption = Annotated[int, typer.Option("--limit", min=1, help="Show at most this many rows.")]
QueueFilter = Annotated[str | None, typer.Option("--queue", "-q", help="Only this queue.")]
TaskFilter = Annotated[str | None, typer.Option("--task", help="Only this task.")]

# What `--all` may touch in one command; the dead-letter table is read in one go.
MAX_DEAD_LETTERS = 10_000_000


class JobState(str, Enum):
    available = "available"
    running = "running"
    waiting = "waiting"


def friendly(function: F) -> F:
    """``pgqueue.cli.main.friendly``, resolved at call time (see the import note above)."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .main import friendly as main_friendly

        return main_friendly(function)(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextmanager
def session(dsn: str | None, *, autocommit: bool = False) -> Iterator[Any]:
    """A CLI session (named, with timeouts); rolled back unless the command committed."""
    from pgqueue import db
    from pgqueue.config import resolve_dsn

    with db.connect(resolve_dsn(dsn), "cli", autocommit=autocommit) as conn:
        yield conn


def run_query(conn: Any, schema: str | None, name: str, params: dict[str, Any]) -> list[Any]:
    from pgqueue import db
    from pgqueue.config import resolve_schema

    return db.run_sync(conn, db.queries(resolve_schema(schema))[name], params)


# ---------------------------------------------------------------- output


def plain(value: Any) -> Any:
    """A JSON-ready copy: times as ISO 8601, durations in seconds, UUIDs as text."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return round(value.total_seconds(), 3)
    if isinstance(value, (UUID, Decimal)):
        return str(value) if isinstance(value, UUID) else float(value)
    return value


def emit_json(value: Any) -> None:
    typer.echo(json.dumps(plain(value)))


def human(value: Any) -> str:
    """One table cell: durations as 1h02m03s, times to the second, nothing as '-'."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, timedelta):
        return duration(value.total_seconds())
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(plain(value))
    return str(value)


def duration(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.1f}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def print_table(
    title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], empty: str
) -> None:
    table = Table(title=title)
    for column in columns:
        numeric = bool(rows) and isinstance(rows[0].get(column), (int, float, Decimal))
        table.add_column(column.replace("_", " "), justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(human(row.get(c)) for c in columns))
    if not rows:
        table.caption = empty
    console.print(table)


def confirm(question: str, yes: bool) -> None:
    """Ask before a destructive action; --yes skips the question (scripts, CI)."""
    if yes:
        return
    if not sys.stdin.isatty():
        typer.echo(
            "error: stdin is not a terminal, so nobody can confirm: add --yes to proceed",
            err=True,
        )
        raise typer.Exit(2)
    if not typer.confirm(question, default=False):
        typer.echo("aborted: nothing changed", err=True)
        raise typer.Exit(1)


# ---------------------------------------------------------------- jobs

jobs_app = typer.Typer(help="List, show, retry and cancel live jobs.", no_args_is_help=True)

JOB_COLUMNS = ("id", "queue", "task", "state", "attempts", "run_at", "ordering_key", "error")


@jobs_app.command("list")
@friendly
def jobs_list(
    queue: QueueFilter = None,
    task: TaskFilter = None,
    state: Annotated[JobState | None, typer.Option("--state", help="Only this state.")] = None,
    limit: LimitOption = 50,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
) -> None:
    """Live jobs (ready, scheduled, running, waiting behind a key), newest first."""
    from pgqueue import operations

    with session(dsn) as conn:
        rows = operations.list_jobs(
            conn,
            queue=queue,
            task=task,
            state=None if state is None else state.value,
            limit=limit,
            schema=schema,
        )
    if json_output:
        emit_json(rows)
        return
    print_table("pgqueue jobs", rows, JOB_COLUMNS, "no live jobs match")


@jobs_app.command("show")
@friendly
def jobs_show(
    job_id: Annotated[int, typer.Argument(metavar="ID", help="Job id.")],
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
) -> None:
    """One job, live or dead-lettered, with its recorded history."""
    from pgqueue.cli.admin import job_events_enabled

    from pgqueue import operations

    with session(dsn) as conn:
        job = operations.show_job(conn, job_id, schema=schema)
        is_recording = job_events_enabled(conn, schema)
    if json_output:
        emit_json({**job, "job_events_recorded": is_recording})
        return
    details = Table(title=f"job {job_id}", show_header=False)
    details.add_column("field")
    details.add_column("value")
    for field, value in job.items():
        if field not in ("history", "last_error"):
            details.add_row(field.replace("_", " "), human(value))
    console.print(details)
    if job.get("last_error"):
        console.print("last error:", style="bold")
        console.print(job["last_error"], markup=False, highlight=False)
    history = job["history"]
    if history:
        print_table("history", history, ("at", "event", "attempt", "worker_id"), "")
    elif not is_recording:
        console.print(
            "no history: job events are not recorded (`pgqueue audit job-events on`)",
            markup=False,
        )
    else:
        console.print("no history recorded for this job yet")


@jobs_app.command("retry")
@friendly
def jobs_retry(
    job_id: Annotated[int, typer.Argument(metavar="ID", help="Job id.")],
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
) -> None:
    """Run a job now: one waiting for its retry or scheduled later, or a dead letter."""
    from pgqueue import operations

    with session(dsn) as conn:
        job = operations.show_job(conn, job_id, schema=schema)
        if job["location"] == "dead":
            where = operations.DeadLetterFilter(ids=[job_id])
            changed = bool(operations.requeue_dead(conn, where, schema=schema))
            outcome = "requeued" if changed else "kept"
        else:
            changed = operations.retry_now(conn, job_id, schema=schema)
            outcome = "ready" if changed else "unchanged"
        conn.commit()
    if json_output:
        emit_json({"id": job_id, "state": job["state"], "outcome": outcome, "changed": changed})
    elif outcome == "requeued":
        typer.echo(f"job {job_id} was dead-lettered; requeued it with fresh attempts")
    elif outcome == "kept":
        typer.echo(
            f"job {job_id} stays in the dead letters: a live job holds its unique key "
            f"{job['unique_key']!r}",
            err=True,
        )
    elif outcome == "ready":
        typer.echo(f"job {job_id} is ready: a worker will run it now")
    elif job["state"] == "waiting":
        typer.echo(
            f"job {job_id} waits behind ordering key {job['ordering_key']!r}; it runs when "
            "the job ahead of it finishes"
        )
    else:
        typer.echo(f"job {job_id} is already {job['state']}: nothing to do")
    if outcome == "kept":
        raise typer.Exit(1)


@jobs_app.command("cancel")
@friendly
def jobs_cancel(
    job_ids: Annotated[list[int], typer.Argument(metavar="ID...", help="Job ids.")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why; stored with the job and in the audit trail.")
    ] = "no reason given",
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
) -> None:
    """Move live jobs to the dead letters (reason 'cancelled').

    A running job is not interrupted, but its result is discarded. Exits 1 when a job was
    not found (it completed, is already dead, or never existed).
    """
    from pgqueue import operations

    with session(dsn) as conn:
        done = operations.cancel_jobs(conn, job_ids, reason=reason, schema=schema)
        conn.commit()
    missing = [i for i in dict.fromkeys(job_ids) if i not in set(done)]
    if json_output:
        emit_json({"cancelled": sorted(done), "not_found": missing})
    else:
        typer.echo(f"cancelled {len(done)} job(s): {', '.join(map(str, sorted(done))) or '-'}")
        if missing:
            typer.echo(
                f"not found (completed, already dead, or never existed): "
                f"{', '.join(map(str, missing))}",
                err=True,
            )
    if missing:
        raise typer.Exit(1)


# ---------------------------------------------------------------- dead letters

dlq_app = typer.Typer(
    help="Dead letters: list, requeue (run again) or purge (delete for good).",
    no_args_is_help=True,
)

ErrorFilter = Annotated[
    str | None,
    typer.Option("--error", help="Only dead letters whose error contains this text (any case)."),
]
AgeFilter = Annotated[
    float | None,
    typer.Option("--older-than-days", min=0, help="Only dead letters older than N days."),
]
IdFilter = Annotated[
    list[int] | None, typer.Option("--id", help="Only this dead letter (repeatable).")
]
AllOption = Annotated[bool, typer.Option("--all", help="Every dead letter.")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Count and show; change nothing.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
DEAD_COLUMNS = ("job_id", "queue", "task", "attempts", "reason", "error", "failed_at")


def dead_letter_filter(
    queue: str | None,
    task: str | None,
    error: str | None,
    older_than_days: float | None,
    ids: list[int] | None = None,
) -> Any:
    from pgqueue.operations import DeadLetterFilter

    return DeadLetterFilter(
        queue=queue,
        task=task,
        error=error or None,
        older_than=None if older_than_days is None else timedelta(days=older_than_days),
        ids=ids or None,
    )


@dlq_app.command("list")
@friendly
def dlq_list(
    queue: QueueFilter = None,
    task: TaskFilter = None,
    error: ErrorFilter = None,
    older_than_days: AgeFilter = None,
    limit: LimitOption = 50,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
) -> None:
    """Dead letters, newest first, with the first line of their error."""
    from pgqueue import operations

    where = dead_letter_filter(queue, task, error, older_than_days)
    with session(dsn) as conn:
        rows = operations.dead_letters(conn, where, limit=limit, schema=schema)
        total = len(rows)
        if total == limit:
            total = operations.count_dead_letters(conn, where, schema=schema)
    if json_output:
        emit_json(rows)
        return
    print_table("pgqueue dead letters", rows, DEAD_COLUMNS, "no dead letters match")
    if total > len(rows):
        typer.echo(f"showing {len(rows)} of {total}; narrow the filters or raise --limit")


def act_on_dead_letters(
    verb: str,
    where: Any,
    *,
    every: bool,
    dry_run: bool,
    yes: bool,
    dsn: str | None,
    schema: str | None,
    json_output: bool,
) -> None:
    """Count the matching dead letters, show them, confirm, then act on exactly those.

    The prompt happens outside any transaction (a session idle in a transaction would hit
    its timeout while a person reads); the action then takes the ids counted, in batches,
    in one transaction with one audit entry, so new dead letters are never swept up.
    """
    from pgqueue import operations

    described = where.describe()
    if not described and not every:
        raise typer.BadParameter(
            "choose the dead letters: --queue, --task, --error, --older-than-days, --id, or --all"
        )
    if described and every:
        raise typer.BadParameter("--all means every dead letter: leave out the filters")
    with session(dsn) as conn:
        rows = operations.dead_letters(conn, where, limit=MAX_DEAD_LETTERS, schema=schema)
    ids = [row["job_id"] for row in rows]
    gerund = {"requeue": "requeued", "purge": "purged"}[verb]
    if dry_run or not ids:
        if json_output:
            emit_json({"matched": len(ids), gerund: 0, "dry_run": dry_run, "ids": ids})
            return
        if rows:
            print_table(f"would {verb}", rows[:20], DEAD_COLUMNS, "")
        more = " (first 20 shown)" if len(rows) > 20 else ""
        typer.echo(
            f"{len(ids)} dead letter(s) match{more}; dry run: nothing changed"
            if dry_run
            else "no dead letters match: nothing to do"
        )
        return
    if not json_output:
        print_table(f"to {verb}", rows[:20], DEAD_COLUMNS, "")
        if len(rows) > 20:
            typer.echo(f"... and {len(rows) - 20} more")
    action = "send back to their queues" if verb == "requeue" else "delete for good"
    confirm(f"{verb.capitalize()} ({action}) {len(ids)} dead letter(s)?", yes)
    query = {"requeue": "requeue_dead_jobs", "purge": "purge_dead_jobs"}[verb]
    done: list[int] = []
    size = operations.ACTION_BATCH
    batches = [ids[i : i + size] for i in range(0, len(ids), size)]
    with (
        session(dsn) as conn,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=progress_console,
            disable=json_output or len(batches) < 2,
            transient=True,
        ) as progress,
    ):
        bar = progress.add_task(f"{verb} dead letters", total=len(ids))
        for batch in batches:
            done.extend(row["id"] for row in run_query(conn, schema, query, {"ids": batch}))
            progress.advance(bar, len(batch))
        operations.record(
            conn,
            f"dlq.{verb}",
            "jobs",
            len(done),
            {**described, "matched": len(ids)},
            schema=schema,
        )
        conn.commit()
    skipped = len(ids) - len(done)
    if json_output:
        emit_json({"matched": len(ids), gerund: len(done), "skipped": skipped, "dry_run": False})
        return
    typer.echo(f"{gerund} {len(done)} of {len(ids)} dead letter(s)")
    if skipped:
        why = (
            "a live job holds their unique key, or someone else took them"
            if verb == "requeue"
            else "someone else took them"
        )
        typer.echo(f"{skipped} left in place: {why}", err=True)


def dead_letter_action(verb: str, description: str) -> Callable[..., None]:
    """The `dlq requeue` or `dlq purge` command: same filters, same safety, one verb."""

    def command(
        queue: QueueFilter = None,
        task: TaskFilter = None,
        error: ErrorFilter = None,
        older_than_days: AgeFilter = None,
        ids: IdFilter = None,
        every: AllOption = False,
        dry_run: DryRunOption = False,
        yes: YesOption = False,
        dsn: DsnOption = None,
        schema: SchemaOption = None,
        json_output: JsonOption = False,
    ) -> None:
        where = dead_letter_filter(queue, task, error, older_than_days, ids)
        act_on_dead_letters(
            verb, where, every=every, dry_run=dry_run, yes=yes, dsn=dsn, schema=schema,
            json_output=json_output,
        )  # fmt: skip

    command.__doc__ = (
        f"{description}\n\nA filter or --all is required. Shows the count and asks first "
        "(--yes skips); acts on exactly the dead letters counted."
    )
    return friendly(command)


dlq_app.command("requeue")(
    dead_letter_action(
        "requeue",
        "Send matching dead letters back to their queues with fresh attempts (same ids). "
        "One whose unique key is held by a live job stays where it is.",
    )
)
dlq_app.command("purge")(
    dead_letter_action(
        "purge", "Delete matching dead letters for good; ordering keys they blocked move on."
    )
)


# ---------------------------------------------------------------- status --check


def check_problems(
    queues: Sequence[dict[str, Any]],
    health: dict[str, Any],
    *,
    max_lag: float | None,
    max_dead: int | None,
    max_outbox_lag: float | None,
    dead_messages: int,
) -> list[str]:
    """What ``pgqueue status --check`` reports: each crossed threshold, and a critical
    health verdict. A threshold is crossed when the value is strictly above it."""
    problems = []
    if max_lag is not None:
        for row in queues:
            if row["lag_seconds"] > max_lag:
                paused = " (the queue is paused)" if row.get("is_paused") else ""
                problems.append(
                    f"queue {row['queue']!r}: lag {row['lag_seconds']:.1f}s > --max-lag "
                    f"{max_lag:g}s{paused}"
                )
    if max_dead is not None:
        dead_jobs = sum(int(row["dead"]) for row in queues)
        if dead_jobs + dead_messages > max_dead:
            problems.append(
                f"{dead_jobs + dead_messages} dead letters ({dead_jobs} jobs, "
                f"{dead_messages} outbox messages) > --max-dead {max_dead}"
            )
    relay_lag = health.get("relay_lag")
    relay_seconds = relay_lag.total_seconds() if isinstance(relay_lag, timedelta) else 0.0
    if max_outbox_lag is not None and relay_seconds > max_outbox_lag:
        problems.append(
            f"outbox: oldest undelivered message waits {relay_seconds:.1f}s > "
            f"--max-outbox-lag {max_outbox_lag:g}s"
        )
    if health.get("verdict") == "critical":
        problems.append(f"health is critical: {health.get('reasons') or 'see pgqueue.health'}")
    return problems


def health_and_dead_messages(dsn: str, schema: str | None) -> tuple[dict[str, Any], int]:
    with session(dsn) as conn:
        health = run_query(conn, schema, "health", {})[0]
        outbox = run_query(conn, schema, "outbox_status", {})
    return health, sum(int(row["dead"]) for row in outbox)


# ---------------------------------------------------------------- registration


def register(app: typer.Typer) -> None:
    """Add the operator command groups to the root ``pgqueue`` app."""
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(dlq_app, name="dlq")
    from pgqueue.cli.admin import register_admin

    register_admin(app)
