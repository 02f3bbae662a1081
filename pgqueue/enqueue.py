"""Enqueue jobs on the caller's connection, inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pgqueue import db
from pgqueue.config import resolve_schema
from pgqueue.names import queue_name, task_name
from pgqueue.payload import DEFAULT_MAX_PAYLOAD_BYTES, encode

DEFAULT_QUEUE = "default"
_PRIORITY_RANGE = range(-32768, 32768)


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


def _seconds(name: str, value: float | timedelta | None) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise ValueError(f"{name} must be a non-negative number of seconds or a timedelta")
    return float(seconds)


def _row(spec: JobSpec, max_payload_bytes: int) -> dict[str, Any]:
    """Validate one job and turn it into bound parameters; raises before any SQL."""
    task = task_name(spec.task)
    queue = queue_name(spec.queue or DEFAULT_QUEUE)
    if spec.args is None or not isinstance(spec.args, Mapping):
        raise TypeError(
            f"args of task {task!r} must be a mapping of keyword arguments, "
            f"got {type(spec.args).__name__}"
        )
    priority = 0 if spec.priority is None else spec.priority
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or priority not in _PRIORITY_RANGE
    ):
        raise ValueError("priority must be an int from -32768 to 32767 (higher runs first)")
    if spec.run_at is not None and spec.delay is not None:
        raise ValueError("give run_at or delay, not both")
    if spec.run_at is not None and (
        not isinstance(spec.run_at, datetime) or spec.run_at.tzinfo is None
    ):
        raise ValueError("run_at must be a timezone-aware datetime (e.g. datetime.now(UTC))")
    if spec.max_attempts is not None and (
        isinstance(spec.max_attempts, bool)
        or not isinstance(spec.max_attempts, int)
        or spec.max_attempts < 1
    ):
        raise ValueError("max_attempts must be an int >= 1")
    headers = dict(spec.headers or {})
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("headers must map str to str")
    return {
        "queue": queue,
        "task": task,
        "args": encode(dict(spec.args), what="args", max_bytes=max_payload_bytes),
        "headers": encode(headers, what="headers", max_bytes=max_payload_bytes),
        "priority": priority,
        "run_at": spec.run_at,
        "delay": _seconds("delay", spec.delay) or 0.0,
        "max_attempts": spec.max_attempts,
        "timeout_seconds": _seconds("timeout", spec.timeout),
    }


def _single(
    task: str,
    args: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    schema: str | None,
    max_payload_bytes: int,
) -> tuple[db.Query, dict[str, Any]]:
    spec = JobSpec(task=task, args=args if args is not None else {}, **options)
    params = _row(spec, max_payload_bytes)
    resolved = resolve_schema(schema)
    params["channel"] = db.channel(resolved, params["queue"])
    params["ordering_key"] = None
    params["unique_key"] = None
    return db.queries(resolved)["insert_job"], params


def _bulk(
    jobs: Iterable[JobSpec | tuple[str, Mapping[str, Any]]],
    defaults: Mapping[str, Any],
    schema: str | None,
    max_payload_bytes: int,
) -> tuple[db.Query, dict[str, Any]] | None:
    columns: dict[str, list[Any]] = {
        name: []
        for name in (
            "queue",
            "task",
            "args",
            "headers",
            "priority",
            "run_at",
            "delay",
            "max_attempts",
            "timeout_seconds",
        )
    }
    for index, item in enumerate(jobs):
        if isinstance(item, JobSpec):
            spec = item
        elif isinstance(item, tuple) and len(item) == 2:
            spec = JobSpec(task=item[0], args=item[1])
        else:
            raise TypeError(f"jobs[{index}] must be a JobSpec or a (task, args) tuple")
        merged = {
            key: getattr(spec, key) if getattr(spec, key) is not None else defaults.get(key)
            for key in (
                "queue",
                "priority",
                "run_at",
                "delay",
                "max_attempts",
                "timeout",
                "headers",
            )
        }
        try:
            row = _row(JobSpec(task=spec.task, args=spec.args, **merged), max_payload_bytes)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"jobs[{index}]: {exc}") from None
        for name, values in columns.items():
            values.append(row[name])
    if not columns["task"]:
        return None
    resolved = resolve_schema(schema)
    params: dict[str, Any] = dict(columns)
    params["schema"] = resolved
    return db.queries(resolved)["insert_jobs"], params


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
    schema: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> int:
    """Add one job in the caller's transaction and return its id.

    ``conn`` is a psycopg ``Connection`` or a SQLAlchemy ``Connection``/``Session`` (psycopg
    driver). The caller owns the transaction: nothing is committed here, and a rollback
    leaves no job. ``delay`` and ``timeout`` are seconds or timedeltas; ``run_at`` is
    timezone-aware; ``priority`` is higher-first. Unset ``max_attempts``/``timeout`` take the
    task's defaults at the worker.

    >>> with psycopg.connect(dsn) as conn, conn.transaction():
    ...     conn.execute("INSERT INTO orders ...")
    ...     job_id = pgqueue.enqueue(conn, "send_receipt", {"order_id": 42}, queue="email")
    """
    options = {
        "queue": queue,
        "priority": priority,
        "run_at": run_at,
        "delay": delay,
        "max_attempts": max_attempts,
        "timeout": timeout,
        "headers": headers,
    }
    query, params = _single(task, args, options, schema, max_payload_bytes)
    rows = db.run_sync(db.sync_connection(conn), query, params)
    return int(rows[0]["id"])


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
    schema: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> int:
    """The async twin of :func:`enqueue` (psycopg ``AsyncConnection``, SQLAlchemy async)."""
    options = {
        "queue": queue,
        "priority": priority,
        "run_at": run_at,
        "delay": delay,
        "max_attempts": max_attempts,
        "timeout": timeout,
        "headers": headers,
    }
    query, params = _single(task, args, options, schema, max_payload_bytes)
    rows = await db.run_async(await db.async_connection(conn), query, params)
    return int(rows[0]["id"])


def enqueue_many(
    conn: Any,
    jobs: Iterable[JobSpec | tuple[str, Mapping[str, Any]]],
    *,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime | None = None,
    delay: float | timedelta | None = None,
    max_attempts: int | None = None,
    timeout: float | timedelta | None = None,
    headers: Mapping[str, str] | None = None,
    schema: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> list[int]:
    """Add many jobs in one statement (one round trip) and return their ids in order.

    Every job is validated before any SQL runs, so one bad item enqueues nothing.

    >>> pgqueue.enqueue_many(conn, [("send_receipt", {"order_id": i}) for i in range(10_000)])
    """
    defaults = {
        "queue": queue,
        "priority": priority,
        "run_at": run_at,
        "delay": delay,
        "max_attempts": max_attempts,
        "timeout": timeout,
        "headers": headers,
    }
    built = _bulk(jobs, defaults, schema, max_payload_bytes)
    if built is None:
        return []
    rows = db.run_sync(db.sync_connection(conn), *built)
    return [int(i) for i in rows[0]["ids"]]


async def enqueue_many_async(
    conn: Any,
    jobs: Iterable[JobSpec | tuple[str, Mapping[str, Any]]],
    *,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime | None = None,
    delay: float | timedelta | None = None,
    max_attempts: int | None = None,
    timeout: float | timedelta | None = None,
    headers: Mapping[str, str] | None = None,
    schema: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> list[int]:
    """The async twin of :func:`enqueue_many`."""
    defaults = {
        "queue": queue,
        "priority": priority,
        "run_at": run_at,
        "delay": delay,
        "max_attempts": max_attempts,
        "timeout": timeout,
        "headers": headers,
    }
    built = _bulk(jobs, defaults, schema, max_payload_bytes)
    if built is None:
        return []
    rows = await db.run_async(await db.async_connection(conn), *built)
    return [int(i) for i in rows[0]["ids"]]
