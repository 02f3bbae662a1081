"""Read-only views of queue state for the CLI and scripts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pgqueue import db
from pgqueue.config import resolve_schema

STATUS_COLUMNS = (
    "queue",
    "ready",
    "scheduled",
    "running",
    "waiting",
    "dead",
    "lag_seconds",
    "completed_last_minute",
    "failed_last_hour",
    "is_paused",
)


def queue_status(dsn: str, schema: str | None = None) -> list[dict[str, Any]]:
    """One row per queue from the ``queue_stats`` view; ``lag`` also as ``lag_seconds``."""
    resolved = resolve_schema(schema)
    with db.connect(dsn, "cli") as conn:
        rows = db.run_sync(conn, db.queries(resolved)["queue_stats"], {})
    for row in rows:
        lag = row.get("lag")
        row["lag_seconds"] = round(lag.total_seconds(), 3) if isinstance(lag, timedelta) else 0.0
    return rows
