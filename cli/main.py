"""The `pgqueue` command: a thin shell over the library.

Exit codes: 0 ok, 1 error (a one-line message on stderr), 2 usage error,
3 schema not ready, 4 worker stopped because handler threads were stuck.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from pgqueue import migrate as migrations
from pgqueue.app import App
from pgqueue.config import find_dsn, resolve_dsn, resolve_schema
from pgqueue.errors import PgQueueError, SchemaNotReady

app = typer.Typer(
    name="pgqueue",
    help="PostgreSQL job queue and transactional outbox.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
migrate_app = typer.Typer(
    help="Upgrade the pgqueue schema, or show it.", invoke_without_command=True
)
app.add_typer(migrate_app, name="migrate")

console = Console()
F = TypeVar("F", bound=Callable[..., Any])

DsnOption = Annotated[
    str | None,
    typer.Option("--dsn", help="PostgreSQL DSN; default $PGQUEUE_DSN, then $DATABASE_URL."),
]
ListenOption = Annotated[
    bool, typer.Option(help="Use LISTEN/NOTIFY (off behind PgBouncer transaction mode).")
]
SchemaOption = Annotated[
    str | None,
    typer.Option(
        "--schema", help="Schema of pgqueue's tables; default $PGQUEUE_SCHEMA or pgqueue."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
LoopOption = Annotated[
    str,
    typer.Option(
        "--event-loop",
        help="auto (uvloop when installed: pip install 'pgqueue[uvloop]'), asyncio or uvloop.",
    ),
]


def friendly(function: F) -> F:
    """Turn pgqueue's errors into one line on stderr and a documented exit code."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except SchemaNotReady as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(3) from None
        except (PgQueueError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("pgqueue")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def load_app(path: str) -> App:
    """Import ``module:attribute`` given on the command line (never from a job row)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise typer.BadParameter("use module:attribute, e.g. myapp.tasks:app", param_hint="--app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise typer.BadParameter(
            f"cannot import {module_name!r}: {exc}", param_hint="--app"
        ) from None
    found = getattr(module, attribute, None)
    if not isinstance(found, App):
        raise typer.BadParameter(
            f"{path} is not a pgqueue.App (found {type(found).__name__})", param_hint="--app"
        )
    return found


# ---------------------------------------------------------------- migrate


@migrate_app.callback()
@friendly
def migrate(
    ctx: typer.Context,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    sql: Annotated[
        bool, typer.Option("--sql", help="Print the SQL instead of running it.")
    ] = False,
) -> None:
    """Upgrade the schema to the newest revision (idempotent; safe to run concurrently)."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"dsn": dsn, "schema": schema}
        return
    resolved = resolve_schema(schema)
    if sql:
        typer.echo(migrations.upgrade_sql(resolved))
        return
    target = resolve_dsn(dsn)
    before = migrations.current(target, resolved)
    migrations.upgrade(target, resolved)
    after = migrations.current(target, resolved)
    if before == after:
        typer.echo(f"schema {resolved!r} already at {after}")
    else:
        typer.echo(f"schema {resolved!r} upgraded from {before or 'nothing'} to {after}")


@migrate_app.command("current")
@friendly
def migrate_current(
    ctx: typer.Context,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show the revision the database is at, and the newest this pgqueue knows."""
    options = ctx.obj or {}
    resolved = resolve_schema(schema or options.get("schema"))
    revision = migrations.current(resolve_dsn(dsn or options.get("dsn")), resolved)
    head = migrations.head_revision()
    if json_output:
        typer.echo(json.dumps({"schema": resolved, "current": revision, "head": head}))
    else:
        state = "up to date" if revision == head else "needs `pgqueue migrate`"
        typer.echo(f"schema {resolved!r}: {revision or 'not migrated'} (head {head}, {state})")


# ---------------------------------------------------------------- worker


@app.command()
@friendly
def worker(
    app_path: Annotated[str, typer.Option("--app", help="module:attribute of your pgqueue.App.")],
    queue: Annotated[
        list[str] | None,
        typer.Option("--queue", "-q", help="Queue to serve (repeatable); default: the app's."),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs run at once in this process.")] = 10,
    lease_seconds: Annotated[
        float, typer.Option(min=0.1, help="Lease length; renewed by heartbeats.")
    ] = 30.0,
    shutdown_grace: Annotated[
        float, typer.Option(min=0, help="Seconds in-flight jobs get after SIGTERM.")
    ] = 30.0,
    poll_seconds: Annotated[
        float, typer.Option(min=0.01, help="Polling interval (always on).")
    ] = 1.0,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Max jobs per claim; default concurrency.")
    ] = None,
    listen: ListenOption = True,
    durable_claims: Annotated[
        bool,
        typer.Option(
            help="Every claim waits for the disk flush (default: a claim of plain jobs does "
            "not; a server crash may take it back, and the job runs again)."
        ),
    ] = False,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port.")
    ] = None,
    event_loop: LoopOption = "auto",
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    log_json: Annotated[
        bool, typer.Option("--log-json", help="One JSON object per log line.")
    ] = False,
) -> None:
    """Run jobs until SIGTERM (graceful) or a second SIGTERM/SIGINT (immediate)."""
    from pgqueue.worker import Worker, WorkerSettings

    _setup_logging(log_level, log_json)
    tasks = load_app(app_path)
    settings = WorkerSettings(
        concurrency=concurrency,
        lease_seconds=lease_seconds,
        shutdown_grace_seconds=shutdown_grace,
        poll_seconds=poll_seconds,
        batch_size=batch_size,
        listen=listen,
        durable_claims=durable_claims,
        metrics_port=metrics_port,
        event_loop=event_loop,
    )
    runner = Worker(tasks, resolve_dsn(dsn), queues=queue or None, schema=schema, settings=settings)
    code = runner.run()
    # Jobs still running on handler threads were released (given back to the queue); the
    # process must not wait for those threads, or a released job would keep running here.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@app.command()
@friendly
def relay(
    app_path: Annotated[str, typer.Option("--app", help="module:attribute of your pgqueue.App.")],
    concurrency: Annotated[int, typer.Option(min=1, help="Messages in flight at once.")] = 256,
    lease_seconds: Annotated[float, typer.Option(min=0.1, help="Lease length.")] = 30.0,
    shutdown_grace: Annotated[
        float, typer.Option(min=0, help="Seconds deliveries get after SIGTERM.")
    ] = 15.0,
    poll_seconds: Annotated[
        float, typer.Option(min=0.01, help="Polling interval (always on).")
    ] = 1.0,
    retention_seconds: Annotated[
        float, typer.Option(min=0, help="Keep delivered history this long; 0: none.")
    ] = 86400.0,
    listen: ListenOption = True,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port.")
    ] = None,
    event_loop: LoopOption = "auto",
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    log_json: Annotated[
        bool, typer.Option("--log-json", help="One JSON object per log line.")
    ] = False,
) -> None:
    """Deliver outbox messages through the app's routes until SIGTERM."""
    from pgqueue.relay import Relay, RelaySettings

    _setup_logging(log_level, log_json)
    routes = load_app(app_path)
    settings = RelaySettings(
        concurrency=concurrency,
        lease_seconds=lease_seconds,
        shutdown_grace_seconds=shutdown_grace,
        poll_seconds=poll_seconds,
        retention_seconds=retention_seconds,
        listen=listen,
        metrics_port=metrics_port,
        event_loop=event_loop,
    )
    runner = Relay(routes, resolve_dsn(dsn), schema=schema, settings=settings)
    raise typer.Exit(runner.run())


# ---------------------------------------------------------------- enqueue and status


@app.command()
@friendly
def enqueue(
    task: Annotated[str, typer.Argument(help="Task name as registered on the app.")],
    args: Annotated[str, typer.Option("--args", help="Keyword arguments as a JSON object.")] = "{}",
    queue: Annotated[str, typer.Option("--queue", "-q")] = "default",
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    delay: Annotated[float, typer.Option(min=0, help="Seconds before the job may run.")] = 0.0,
    max_attempts: Annotated[int | None, typer.Option(min=1)] = None,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
) -> None:
    """Add one job (in its own transaction) and print its id."""
    from pgqueue import db
    from pgqueue.enqueue import enqueue as enqueue_job

    try:
        arguments = json.loads(args)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--args") from None
    with db.connect(resolve_dsn(dsn), "cli", autocommit=False) as conn:
        job_id = enqueue_job(
            conn,
            task,
            arguments,
            queue=queue,
            priority=priority,
            delay=delay,
            max_attempts=max_attempts,
            schema=schema,
        )
        conn.commit()
    typer.echo(json.dumps({"id": job_id, "task": task, "queue": queue}) if json_output else job_id)


@app.command()
@friendly
def status(
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    json_output: JsonOption = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Exit 5 when a threshold is crossed or pgqueue.health says critical.",
        ),
    ] = False,
    max_lag: Annotated[
        float | None,
        typer.Option(min=0, help="Check: oldest ready job of any queue older than SECONDS."),
    ] = None,
    max_dead: Annotated[
        int | None,
        typer.Option(min=0, help="Check: more than N dead letters (jobs and outbox messages)."),
    ] = None,
    max_outbox_lag: Annotated[
        float | None,
        typer.Option(min=0, help="Check: oldest undelivered outbox message older than SECONDS."),
    ] = None,
) -> None:
    """Per queue: jobs by state, age of the oldest ready job (lag), recent throughput.

    With --check (implied by any --max-...): exit 5 and say which threshold was crossed,
    or why the health verdict is critical; exit 0 otherwise. For cron and probes.
    """
    from pgqueue.status import STATUS_COLUMNS, queue_status

    from .operations import check_problems, health_and_dead_messages, plain

    target = resolve_dsn(dsn)
    rows = queue_status(target, schema)
    queues = [{k: row[k] for k in STATUS_COLUMNS} for row in rows]
    if not (check or max_lag is not None or max_dead is not None or max_outbox_lag is not None):
        if json_output:
            typer.echo(json.dumps(queues))
        else:
            print_status(rows)
        return
    health, dead_messages = health_and_dead_messages(target, schema)
    problems = check_problems(
        rows,
        health,
        max_lag=max_lag,
        max_dead=max_dead,
        max_outbox_lag=max_outbox_lag,
        dead_messages=dead_messages,
    )
    if json_output:
        report = {"ok": not problems, "problems": problems, "queues": queues, "health": health}
        typer.echo(json.dumps(plain(report)))
    else:
        print_status(rows, health)
        for problem in problems:
            typer.echo(f"check failed: {problem}", err=True)
        if not problems:
            typer.echo("check passed: no threshold crossed")
    if problems:
        raise typer.Exit(5)


def print_status(rows: list[dict[str, Any]], health: dict[str, Any] | None = None) -> None:
    from rich import box

    from pgqueue.status import count_cells, describe_limits, describe_seconds

    headers = ("ready", "sched", "run", "wait", "dead", "lag", "done/min", "dead/h", "paused")
    lines = []
    for row in rows:
        cells = count_cells(row)
        cells.append(describe_seconds(row["lag_seconds"]))
        cells += [str(row["completed_last_minute"]), str(row["failed_last_hour"])]
        cells.append("yes" if row["is_paused"] else "no")
        lines.append((row["queue"], cells))
    # Rules only under the header and one space between columns: the table fits an
    # 80-column terminal. Numbers are never cut; a long queue name folds instead.
    table = Table(title="pgqueue status", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("queue", overflow="fold")
    for index, header in enumerate(headers):
        widest = max((len(cells[index]) for _, cells in lines), default=0)
        table.add_column(header, justify="right", no_wrap=True, min_width=max(widest, len(header)))
    for queue, cells in lines:
        table.add_row(queue, *cells)
    if any(row["counts_estimated"] for row in rows):
        table.caption = (
            "past 2,000 a count is the planner's estimate (~); 2001+ means at least that many "
            "(the table's statistics are older than its rows)"
        )
    if not rows:
        table.caption = "no queues yet"
    console.print(table)
    for row in rows:
        limits = describe_limits(row)
        if limits != "-":
            console.print(f"limits of {row['queue']}: {limits}", markup=False, highlight=False)
    if health is not None:
        reasons = f": {health['reasons']}" if health.get("reasons") else ""
        console.print(f"health: {health['verdict']}{reasons}", markup=False, highlight=False)


# ---------------------------------------------------------------- dev and demo


@app.command()
@friendly
def dev(
    stop: Annotated[bool, typer.Option("--stop", help="Stop the local server.")] = False,
    schema: SchemaOption = None,
) -> None:
    """Start (or reuse) a local PostgreSQL in ./.pgqueue, migrate it and print its DSN."""
    from pgqueue.embedded import LocalPostgres, default_data_dir

    server = LocalPostgres(default_data_dir())
    if stop:
        server.stop()
        typer.echo("local PostgreSQL stopped")
        return
    server.start()
    dsn = server.dsn()
    migrations.upgrade(dsn, resolve_schema(schema))
    typer.echo(f"PostgreSQL {server.major_version()} running, pgqueue schema migrated.")
    typer.echo(f"export PGQUEUE_DSN='{dsn}'")


@app.command()
@friendly
def demo(
    orders: Annotated[int, typer.Option(min=1, help="Orders (each with a job) to create.")] = 3000,
    dsn: DsnOption = None,
) -> None:
    """Orders and jobs in one transaction, workers with a progress bar, a retry, a dead letter."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from pgqueue import demo as shop
    from pgqueue.status import queue_status

    server = None
    target = find_dsn(dsn)
    if target is None:
        from pgqueue.embedded import LocalPostgres, default_data_dir

        server = LocalPostgres(default_data_dir())
        server.start()
        target = server.dsn()
        console.print(
            f"No DSN given: using the embedded PostgreSQL {server.major_version()} in ./.pgqueue"
        )
    _setup_logging("warning", False)
    try:
        migrations.upgrade(target)
        console.print(
            f"Placing {orders} orders; each transaction writes orders and their jobs together…"
        )
        shop.place_orders(target, orders)
        total = shop.remaining(target)
        console.print(
            f"{total} jobs and outbox messages committed "
            "(one order was rolled back: it left no job)."
        )
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("jobs and deliveries", total=total)
            shop.run_workers(
                target, on_progress=lambda left: progress.update(bar, completed=total - left)
            )
        facts = shop.verify(target)
        console.print(
            f"Receipts sent: {facts['receipts_sent']} of {facts['orders']} orders "
            f"(each with its ack, in one transaction). Dead letters: {facts['dead_letters']}.\n"
            f"order.created events delivered by the relay: {facts['events_delivered']}, "
            f"per-customer order kept: {'yes' if facts['events_in_key_order'] else 'NO'}."
        )
        print_status(queue_status(target))
        from pgqueue import db

        with db.connect(target, "demo") as conn:
            dead = conn.execute(
                "SELECT job_id, task, attempts, reason, error FROM pgqueue.dead_letters"
            ).fetchall()
        for job_id, task, attempts, reason, error in dead:
            console.print(
                f"dead letter: job {job_id} {task} after {attempts} attempts ({reason}): {error}"
            )
    finally:
        if server is not None:
            server.stop()


def _register_groups() -> None:
    from pgqueue.cli.operations import register
    from pgqueue.cli.outbox import outbox_app
    from pgqueue.cli.queues import queues_app

    app.add_typer(queues_app, name="queues")
    app.add_typer(outbox_app, name="outbox")
    register(app)


def main() -> None:
    """Console-script entry point."""
    app()


_register_groups()


if __name__ == "__main__":
    main()
