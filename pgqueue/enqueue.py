"""Enqueue jobs on the caller's connection, inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, Literal

from pgqueue import bulk, db
from pgqueue.config import resolve_schema
from pgqueue.errors import DatabaseError, DuplicateJob, QueueFull
from pgqueue.names import key_value, queue_name, task_name
from pgqueue.payload import DEFAULT_MAX_PAYLOAD_BYTES, encode

DEFAULT_QUEUE = "default"
_NO_HEADERS = "{}"
_PRIORITY_RANGE = range(-32768, 32768)
OnDuplicate = Literal["return", "raise"]


@dataclass(frozen=True)
class JobSpec:
    """One job for :func:`enqueue_many`; unset options fall back to the call's defaults."""

    task: str
    args: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    run_at: datetime | None = None
    delay: float | timedelta | None = None
    max_attempts: int | None = None
    timeout: float | timedelta | None = None
    headers: Mapping[str, str] | None = None
    ordering_key: str | None = None
    unique_key: str | None = None


_OPTIONS = tuple(f.name for f in fields(JobSpec) if f.name not in ("task", "args"))
_COLUMNS = (
    "queue",
    "task",
    "args",
    "headers",
    "priority",
    "run_at",
    "delay",
    "max_attempts",
    "timeout_seconds",
    "ordering_key",
    "unique_key",
)


def _seconds(name: str, value: float | timedelta | None) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise ValueError(f"{name} must be a non-negative number of seconds or a timedelta")
    return float(seconds)


def _row(spec: JobSpec, max_payload_bytes: int) -> dict[str, Any]:
    """Validate one job and turn it into bound parameters; raises before any SQL."""
    return _validated(
        spec.task,
        spec.args,
        max_payload_bytes,
        queue=spec.queue,
        priority=spec.priority,
        run_at=spec.run_at,
        delay=spec.delay,
        max_attempts=spec.max_attempts,
        timeout=spec.timeout,
        headers=spec.headers,
        ordering_key=spec.ordering_key,
        unique_key=spec.unique_key,
    )


def _validated(
    task: str,
    args: Mapping[str, Any] | None,
    max_payload_bytes: int,
    *,
    queue: str | None,
    priority: int | None,
    run_at: datetime | None,
    delay: float | timedelta | None,
    max_attempts: int | None,
    timeout: float | timedelta | None,
    headers: Mapping[str, str] | None,
    ordering_key: str | None,
    unique_key: str | None,
) -> dict[str, Any]:
    """One job's bound parameters, every option checked: the rules of :func:`enqueue`."""
    task = task_name(task)
    queue = queue_name(DEFAULT_QUEUE if queue is None else queue)
    if args is None or not isinstance(args, Mapping):
        raise TypeError(
            f"args of task {task!r} must be a mapping of keyword arguments, "
            f"got {type(args).__name__}"
        )
    priority = 0 if priority is None else priority
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or priority not in _PRIORITY_RANGE
    ):
        raise ValueError("priority must be an int from -32768 to 32767 (higher runs first)")
    if run_at is not None and delay is not None:
        raise ValueError("give run_at or delay, not both")
    if run_at is not None and (not isinstance(run_at, datetime) or run_at.tzinfo is None):
        raise ValueError("run_at must be a timezone-aware datetime (e.g. datetime.now(UTC))")
    if max_attempts is not None and (
        isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
    ):
        raise ValueError("max_attempts must be an int >= 1")
    if headers:
        headers = dict(headers)
        for key, value in headers.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError("headers must map str to str")
    args_text = encode(
        args if type(args) is dict else dict(args), what="args", max_bytes=max_payload_bytes
    )
    return {
        "queue": queue,
        "task": task,
        "args": args_text,
        "headers": encode(headers, what="headers", max_bytes=max_payload_bytes)
        if headers
        else _NO_HEADERS,
        "priority": priority,
        "run_at": run_at,
        "delay": _seconds("delay", delay) or 0.0,
        "max_attempts": max_attempts,
        "timeout_seconds": _seconds("timeout", timeout),
        "ordering_key": None if ordering_key is None else key_value("ordering_key", ordering_key),
        "unique_key": None if unique_key is None else key_value("unique_key", unique_key),
    }


def build(
    jobs: Iterable[JobSpec | tuple[str, Mapping[str, Any]]],
    defaults: Mapping[str, Any],
    schema: str | None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> tuple[db.Query, dict[str, Any]] | None:
    """The query and parameters that enqueue ``jobs``; None when there is nothing to do.

    Shared by the sync and async twins; every job is validated before any SQL.
    """
    columns: dict[str, list[Any]] = {name: [] for name in _COLUMNS}
    # (task, args) tuples share every option: validate those once, then per job only the
    # task name (cached) and the arguments. JobSpecs take the full path.
    template: dict[str, Any] | None = None
    known_tasks: set[str] = set()
    args_column = columns["args"]
    task_column = columns["task"]
    others = [(name, columns[name]) for name in _COLUMNS if name not in ("task", "args")]
    for index, item in enumerate(jobs):
        try:
            if isinstance(item, tuple) and len(item) == 2 and not isinstance(item, JobSpec):
                task, args = item
                if template is None:
                    template = _row(
                        JobSpec(task=task, args={}, **_defaults(defaults)), max_payload_bytes
                    )
                args_column.append(bulk.encode_plain(task, args, known_tasks, max_payload_bytes))
                task_column.append(task)
                for name, values in others:
                    values.append(template[name])
                continue
            if not isinstance(item, JobSpec):
                raise TypeError("each job must be a JobSpec or a (task, args) tuple")
            merged = {
                name: getattr(item, name) if getattr(item, name) is not None else defaults.get(name)
                for name in _OPTIONS
            }
            if item.run_at is not None or item.delay is not None:
                # A job's own timing replaces the call's default timing as a whole.
                merged["run_at"], merged["delay"] = item.run_at, item.delay
            row = _row(JobSpec(task=item.task, args=item.args, **merged), max_payload_bytes)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"jobs[{index}]: {exc}") from None
        for name, values in columns.items():
            values.append(row[name])
    if not columns["task"]:
        return None
    resolved = resolve_schema(schema)
    return db.queries(resolved)["enqueue_jobs"], dict(columns)


def _defaults(defaults: Mapping[str, Any]) -> dict[str, Any]:
    return {name: defaults.get(name) for name in _OPTIONS}


def interpret(rows: Sequence[Mapping[str, Any]], on_duplicate: OnDuplicate) -> list[int]:
    """Job ids in input order from the function's result; raise QueueFull/DuplicateJob."""
    ids: list[int] = []
    for row in rows:
        status = row["status"]
        if status.startswith("queue_full:"):
            queue = status.partition(":")[2]
            raise QueueFull(
                f"queue {queue!r} is at its maximum depth: nothing was enqueued by this call; "
                "the transaction is still usable (commit what you have, or roll back)"
            )
        if status == "duplicate" and on_duplicate == "raise":
            raise DuplicateJob(
                f"a live job with this unique key already exists (job {row['job_id']})",
                job_id=int(row["job_id"]),
            )
        ids.append(int(row["job_id"]))
    return ids


def _copy_outcome(row: Mapping[str, Any]) -> str:
    status: str = row["status"]
    if status.startswith("queue_full:"):
        interpret([{"status": status, "job_id": None}], "return")
    return status


def _single(row: dict[str, Any], schema: str | None) -> tuple[db.Query, dict[str, Any]]:
    """The query of a one-job call: a plain job takes the short ``enqueue_job`` path. Both
    queries end their row with (job_id, status).

    Built straight from the one validated row (no JobSpec, no per-column lists): this runs
    once per producer transaction, and its Python cost is paid on the caller's request path.
    """
    queries = db.queries(resolve_schema(schema))
    if row["ordering_key"] is None and row["unique_key"] is None:
        del row["ordering_key"], row["unique_key"]
        return queries["enqueue_job"], row
    return queries["enqueue_jobs"], {name: [row[name]] for name in _COLUMNS}


def _single_id(row: tuple[Any, ...] | None, on_duplicate: OnDuplicate) -> int:
    if row is None:
        raise DatabaseError(
            "the enqueue function returned no row: is the schema migrated (pgqueue migrate)?",
            is_transient=False,
        )
    job_id, status = row[-2:]
    return interpret([{"job_id": job_id, "status": status}], on_duplicate)[0]


def enqueue(
    conn: Any,
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime | None = None,
    delay: float | timedelta | None = None,
    max_attempts: int | None = None,
    timeout: float | timedelta | None = None,
    headers: Mapping[str, str] | None = None,
    ordering_key: str | None = None,
    unique_key: str | None = None,
    on_duplicate: OnDuplicate = "return",
    schema: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> int:
    """Add one job in the caller's transaction and return its id.

    ``conn`` is a psycopg ``Connection`` or a SQLAlchemy ``Connection``/``Session`` (psycopg
    driver). The caller owns the transaction: nothing is committed here, and a rollback
    leaves no job. ``delay`` and ``timeout`` are seconds or timedeltas; ``run_at`` is
    timezone-aware; ``priority`` is higher-first. Unset ``max_attempts``/``timeout`` take the
    task's defaults at the worker. Jobs sharing an ``ordering_key`` (per queue) run one at a
    time in commit order. With a ``unique_key``, a live job with the same key in the queue is
    returned instead (or ``DuplicateJob`` raised with ``on_duplicate="raise"``).

    >>> with psycopg.connect(dsn) as conn, conn.transaction():
    ...     conn.execute("INSERT INTO orders ...")
    ...     job_id = pgqueue.enqueue(conn, "send_receipt", {"order_id": 42}, queue="email")
    """
    query, params = _single(
        _validated(
            task,
            {} if args is None else args,
            max_payload_bytes,
            queue=queue,
            priority=priority,
            run_at=run_at,
            delay=delay,
            max_attempts=max_attempts,
            timeout=timeout,
            headers=headers,
            ordering_key=ordering_key,
            unique_key=unique_key,
        ),
        schema,
    )
    found = db.first_row_sync(db.sync_connection(conn), query, params)
    return _single_id(found, on_duplicate)


async def enqueue_async(
    conn: Any,
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime | None = None,
    delay: float | timedelta | None = None,
    max_attempts: int | None = None,
    timeout: float | timedelta | None = None,
    headers: Mapping[str, str] | None = None,
    ordering_key: str | None = None,
    unique_key: str | None = None,
    on_duplicate: OnDuplicate = "return",
    schema: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> int:
    """The async twin of :func:`enqueue` (psycopg ``AsyncConnection``, SQLAlchemy async)."""
    query, params = _single(
        _validated(
            task,
            {} if args is None else args,
            max_payload_bytes,
            queue=queue,
            priority=priority,
            run_at=run_at,
            delay=delay,
            max_attempts=max_attempts,
            timeout=timeout,
            headers=headers,
            ordering_key=ordering_key,
            unique_key=unique_key,
        ),
        schema,
    )
    found = await db.first_row_async(await db.async_connection(conn), query, params)
    return _single_id(found, on_duplicate)


def enqueue_many(
    conn: Any,
    jobs: Iterable[JobSpec | tuple[str, Mapping[str, Any]]],
    *,
    on_duplicate: OnDuplicate = "return",
    schema: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    **defaults: Any,
) -> list[int]:
    """Add many jobs in one round trip and return their ids in input order.

    ``defaults`` are the options of :func:`enqueue` (queue, priority, delay, ...) for every
    job that does not set its own. One bad item enqueues nothing and leaves the caller's
    transaction usable: jobs are validated before any SQL, except a large list of
    ``(task, args)`` tuples, which is encoded while its COPY streams and taken back by a
    savepoint when an item is bad. From 1,000 plain jobs on, the rows go in by one COPY.

    >>> pgqueue.enqueue_many(conn, [("send_receipt", {"order_id": i}) for i in range(10_000)])
    """
    _check_defaults(defaults)
    items = jobs if isinstance(jobs, list) else list(jobs)
    if not items:
        return []
    stream = _stream(items, defaults, max_payload_bytes)
    target = db.sync_connection(conn)
    queries = db.queries(resolve_schema(schema))
    if stream is not None:
        with db.savepoint_sync(target):
            row = db.run_sync(
                target, queries["prepare_bulk_enqueue"], stream.request(), binary=True
            )[0]
            if _copy_outcome(row) == "copy":
                name, chunks = stream.chunks(row["db_now"], row["ids"])
                db.copy_sync(target, queries[name], chunks)
                return list(row["ids"])
    built = build(items, defaults, schema, max_payload_bytes)
    if built is None:
        return []
    query, params = built
    if stream is None and bulk.is_copyable(params):
        row = db.run_sync(target, queries["prepare_bulk_enqueue"], _request(params), binary=True)[0]
        if _copy_outcome(row) == "copy":
            name, chunks = bulk.copy_text(params, row["db_now"], row["ids"])
            db.copy_sync(target, queries[name], chunks)
            return list(row["ids"])
    return interpret(db.run_sync(target, query, params), on_duplicate)


async def enqueue_many_async(
    conn: Any,
    jobs: Iterable[JobSpec | tuple[str, Mapping[str, Any]]],
    *,
    on_duplicate: OnDuplicate = "return",
    schema: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    **defaults: Any,
) -> list[int]:
    """The async twin of :func:`enqueue_many`."""
    _check_defaults(defaults)
    items = jobs if isinstance(jobs, list) else list(jobs)
    if not items:
        return []
    stream = _stream(items, defaults, max_payload_bytes)
    target = await db.async_connection(conn)
    queries = db.queries(resolve_schema(schema))
    if stream is not None:
        async with db.savepoint_async(target):
            request = stream.request()
            row = (
                await db.run_async(target, queries["prepare_bulk_enqueue"], request, binary=True)
            )[0]
            if _copy_outcome(row) == "copy":
                name, chunks = stream.chunks(row["db_now"], row["ids"])
                await db.copy_async(target, queries[name], chunks)
                return list(row["ids"])
    built = build(items, defaults, schema, max_payload_bytes)
    if built is None:
        return []
    query, params = built
    if stream is None and bulk.is_copyable(params):
        request = _request(params)
        row = (await db.run_async(target, queries["prepare_bulk_enqueue"], request, binary=True))[0]
        if _copy_outcome(row) == "copy":
            name, chunks = bulk.copy_text(params, row["db_now"], row["ids"])
            await db.copy_async(target, queries[name], chunks)
            return list(row["ids"])
    return interpret(await db.run_async(target, query, params), on_duplicate)


def _stream(
    items: list[Any], defaults: Mapping[str, Any], max_payload_bytes: int
) -> bulk.TupleStream | None:
    """The streamed COPY of (task, args) tuples sharing the call's options, when it applies."""
    # TupleStream.of checks every item; here only what building the options needs.
    first = items[0]
    if len(items) < bulk.COPY_THRESHOLD or type(first) is not tuple or len(first) != 2:
        return None
    first_task = first[0]
    try:
        options = _row(JobSpec(task=first_task, args={}, **_defaults(defaults)), max_payload_bytes)
    except (TypeError, ValueError):
        return None  # the general path reports it, with the job's position
    return bulk.TupleStream.of(items, options, max_payload_bytes)


def _request(params: Mapping[str, list[Any]]) -> dict[str, Any]:
    return bulk.prepare_request(params["queue"])


def _check_defaults(defaults: Mapping[str, Any]) -> None:
    unknown = sorted(set(defaults) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown enqueue option(s) {unknown}: use {', '.join(_OPTIONS)}")
