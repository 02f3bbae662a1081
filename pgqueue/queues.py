"""Queue settings that every worker obeys: pause, global concurrency, rate limit, max depth."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pgqueue import db
from pgqueue.config import resolve_schema
from pgqueue.names import queue_name
from pgqueue.operations import record


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class QueueSettings:
    """A queue's row in ``pgqueue.queues``; None means no limit."""

    name: str
    is_paused: bool
    concurrency_limit: int | None
    rate_limit: int | None
    rate_interval_seconds: float | None
    max_depth: int | None


def _positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, or None for no limit")
    return value


def configure_queue(
    conn: Any,
    name: str,
    *,
    is_paused: bool | None = None,
    concurrency_limit: int | None = UNSET,
    rate_limit: tuple[int, float | timedelta] | None = UNSET,
    max_depth: int | None = UNSET,
    schema: str | None = None,
) -> QueueSettings:
    """Create or change a queue's settings in the caller's transaction.

    Arguments left out keep their value; ``None`` removes a limit. ``rate_limit`` is
    ``(jobs, per)``, e.g. ``(50, 1.0)`` for 50 job starts per second across all workers.
    ``concurrency_limit`` caps running jobs of the queue across all workers. ``max_depth``
    makes enqueue raise :class:`pgqueue.QueueFull` beyond that many waiting jobs.

    >>> pgqueue.configure_queue(conn, "billing", concurrency_limit=3, rate_limit=(50, 1.0))
    """
    params: dict[str, Any] = {
        "name": queue_name(name),
        "is_paused": is_paused,
        "set_concurrency": concurrency_limit is not UNSET,
        "concurrency_limit": None
        if concurrency_limit is UNSET
        else _positive("concurrency_limit", concurrency_limit),
        "set_rate": rate_limit is not UNSET,
        "rate_limit": None,
        "rate_interval_seconds": None,
        "set_depth": max_depth is not UNSET,
        "max_depth": None if max_depth is UNSET else _positive("max_depth", max_depth),
    }
    if rate_limit is not UNSET and rate_limit is not None:
        if not isinstance(rate_limit, tuple) or len(rate_limit) != 2:
            raise ValueError("rate_limit must be (jobs, per_seconds), e.g. (50, 1.0), or None")
        jobs, per = rate_limit
        seconds = per.total_seconds() if isinstance(per, timedelta) else per
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError("the rate limit interval must be a positive number of seconds")
        params["rate_limit"] = _positive("rate_limit jobs", jobs)
        params["rate_interval_seconds"] = float(seconds)
    rows = db.run_sync(
        db.sync_connection(conn), db.queries(resolve_schema(schema))["configure_queue"], params
    )
    settings = QueueSettings(**rows[0])
    action = {True: "queue.pause", False: "queue.resume", None: "queue.configure"}[is_paused]
    changes = {k: v for k, v in params.items() if not k.startswith("set_") and k != "name"}
    record(conn, action, f"queue {settings.name}", 1, changes, schema=schema)
    return settings


def pause_queue(conn: Any, name: str, *, schema: str | None = None) -> QueueSettings:
    """Stop every worker from claiming jobs of ``name``; enqueue keeps working."""
    return configure_queue(conn, name, is_paused=True, schema=schema)


def resume_queue(conn: Any, name: str, *, schema: str | None = None) -> QueueSettings:
    """Let workers claim jobs of ``name`` again."""
    return configure_queue(conn, name, is_paused=False, schema=schema)


def list_queues(conn: Any, *, schema: str | None = None) -> list[QueueSettings]:
    """Settings of every known queue."""
    rows = db.run_sync(
        db.sync_connection(conn), db.queries(resolve_schema(schema))["list_queues"], {}
    )
    return [QueueSettings(**{k: v for k, v in row.items() if k != "updated_at"}) for row in rows]
