"""Operator actions on jobs and dead letters, each recorded in the append-only audit trail."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pgqueue import db
from pgqueue.config import resolve_schema
from pgqueue.errors import NotFound
from pgqueue.names import queue_name, task_name

ACTION_BATCH = 1000


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters an action touches. Unset fields match everything.

    ``error`` matches a case-insensitive substring of the error text; ``older_than`` keeps
    dead letters that failed more than that long ago (database clock).
    """

    queue: str | None = None
    task: str | None = None
    error: str | None = None
    older_than: timedelta | None = None
    ids: Sequence[int] | None = None

    def params(self, limit: int) -> dict[str, Any]:
        return {
            "queue": None if self.queue is None else queue_name(self.queue),
            "task": None if self.task is None else task_name(self.task),
            "error": self.error,
            "older_than": None if self.older_than is None else self.older_than.total_seconds(),
            "ids": None if self.ids is None else list(self.ids),
            "limit": limit,
        }

    def describe(self) -> dict[str, Any]:
        described = {k: v for k, v in self.params(0).items() if v is not None and k != "limit"}
        return described


def _run(conn: Any, schema: str | None, name: str, params: dict[str, Any]) -> list[Any]:
    return db.run_sync(db.sync_connection(conn), db.queries(resolve_schema(schema))[name], params)


def record(
    conn: Any,
    action: str,
    target: str,
    count: int,
    details: dict[str, Any] | None = None,
    *,
    schema: str | None = None,
) -> None:
    """Append an operator action to ``audit_log`` in the caller's transaction."""
    _run(
        conn,
        schema,
        "audit",
        {"action": action, "target": target, "count": count, "details": json.dumps(details or {})},
    )


def dead_letters(
    conn: Any, where: DeadLetterFilter, *, limit: int = 100, schema: str | None = None
) -> list[dict[str, Any]]:
    """Dead letters matching ``where``, newest first."""
    return _run(conn, schema, "select_dead_jobs", where.params(limit))


def count_dead_letters(conn: Any, where: DeadLetterFilter, *, schema: str | None = None) -> int:
    return len(_run(conn, schema, "select_dead_jobs", where.params(10_000_000)))


def _in_batches(
    conn: Any, where: DeadLetterFilter, query: str, schema: str | None, limit: int | None
) -> list[int]:
    done: list[int] = []
    seen: set[int] = set()
    while limit is None or len(done) < limit:
        size = ACTION_BATCH if limit is None else min(ACTION_BATCH, limit - len(done))
        batch = [
            row["job_id"] for row in _run(conn, schema, "select_dead_jobs", where.params(size))
        ]
        batch = [job_id for job_id in batch if job_id not in seen]
        if not batch:
            break
        seen.update(batch)
        done.extend(row["id"] for row in _run(conn, schema, query, {"ids": batch}))
    return done


def requeue_dead(
    conn: Any,
    where: DeadLetterFilter,
    *,
    limit: int | None = None,
    schema: str | None = None,
) -> list[int]:
    """Send matching dead letters back to their queues with fresh attempts; audited.

    Runs in the caller's transaction (commit to apply). A dead letter whose unique key is
    held by a live job stays where it is. Returns the requeued ids.
    """
    ids = _in_batches(conn, where, "requeue_dead_jobs", schema, limit)
    record(conn, "dlq.requeue", "jobs", len(ids), where.describe(), schema=schema)
    return ids


def purge_dead(
    conn: Any,
    where: DeadLetterFilter,
    *,
    limit: int | None = None,
    schema: str | None = None,
) -> list[int]:
    """Delete matching dead letters for good (ordering keys they blocked move on); audited."""
    ids = _in_batches(conn, where, "purge_dead_jobs", schema, limit)
    record(conn, "dlq.purge", "jobs", len(ids), where.describe(), schema=schema)
    return ids


def cancel_jobs(
    conn: Any, ids: Sequence[int], *, reason: str = "no reason given", schema: str | None = None
) -> list[int]:
    """Move live jobs to the dead letters (reason 'cancelled'); audited.

    A running job is not interrupted, but its worker's result is discarded (fenced) and the
    job's ordering key moves on at once.
    """
    done = [
        row["id"] for row in _run(conn, schema, "cancel_jobs", {"ids": list(ids), "reason": reason})
    ]
    record(
        conn, "jobs.cancel", "jobs", len(done), {"ids": list(ids), "reason": reason}, schema=schema
    )
    return done


def retry_now(conn: Any, job_id: int, *, schema: str | None = None) -> bool:
    """Make a job that waits for a retry (or is scheduled) ready now; audited."""
    changed = bool(_run(conn, schema, "retry_job_now", {"id": job_id}))
    if not changed and not _run(conn, schema, "show_job", {"id": job_id}):
        raise NotFound(f"no job {job_id}: it completed, or never existed")
    record(conn, "jobs.retry", f"job {job_id}", int(changed), schema=schema)
    return changed


def show_job(conn: Any, job_id: int, *, schema: str | None = None) -> dict[str, Any]:
    """A job (live or dead) with its recorded history."""
    rows = _run(conn, schema, "show_job", {"id": job_id})
    if not rows:
        raise NotFound(
            f"no job {job_id}: it completed (completed jobs leave the table), or never existed"
        )
    job = dict(rows[0])
    job["history"] = _run(conn, schema, "job_history", {"id": job_id})
    return job


def list_jobs(
    conn: Any,
    *,
    queue: str | None = None,
    task: str | None = None,
    state: str | None = None,
    limit: int = 100,
    schema: str | None = None,
) -> list[dict[str, Any]]:
    """Live jobs, newest first."""
    if state is not None and state not in ("available", "running", "waiting"):
        raise ValueError("state must be one of available, running, waiting")
    params = {
        "queue": None if queue is None else queue_name(queue),
        "task": None if task is None else task_name(task),
        "state": state,
        "limit": limit,
    }
    return _run(conn, schema, "list_jobs", params)


@dataclass(frozen=True)
class PruneResult:
    dead_jobs: int
    dead_messages: int
    delivered_messages: int
    job_events: int


def prune(
    conn: Any,
    *,
    dead_older_than: timedelta | None = timedelta(days=30),
    delivered_older_than: timedelta | None = timedelta(days=1),
    events_older_than: timedelta | None = timedelta(days=7),
    batch: int = 5000,
    schema: str | None = None,
) -> PruneResult:
    """Delete old history in batches of ``batch`` rows (commit between calls to keep locks
    short: this function commits after each batch when ``conn`` is a pgqueue session in
    autocommit mode, and otherwise leaves the transaction to the caller). ``None`` skips."""
    counts = {}
    for key, query, older in (
        ("dead_jobs", "prune_dead_jobs", dead_older_than),
        ("dead_messages", "prune_outbox_dead", dead_older_than),
        ("delivered_messages", "prune_delivered_history", delivered_older_than),
        ("job_events", "prune_job_events", events_older_than),
    ):
        total = 0
        while older is not None:
            deleted = len(
                _run(conn, schema, query, {"older_than": older.total_seconds(), "limit": batch})
            )
            total += deleted
            if deleted < batch:
                break
        counts[key] = total
    result = PruneResult(**counts)
    record(conn, "prune", "history", sum(counts.values()), counts, schema=schema)
    return result
