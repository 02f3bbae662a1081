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
    "concurrency_limit",
    "rate_limit",
    "rate_interval_seconds",
    "max_depth",
    "counts_estimated",
)
# Counts the table shows with a "~": the planner's estimate past 2,000 (see queue_stats).
ESTIMATED_COUNTS = ("ready", "scheduled", "running", "waiting", "dead")


def queue_status(dsn: str, schema: str | None = None) -> list[dict[str, Any]]:
    """One row per queue from the ``queue_stats`` view; ``lag`` also as ``lag_seconds``."""
    resolved = resolve_schema(schema)
    with db.connect(dsn, "cli") as conn:
        rows = db.run_sync(conn, db.queries(resolved)["queue_stats"], {})
    for row in rows:
        lag = row.get("lag")
        row["lag_seconds"] = round(lag.total_seconds(), 3) if isinstance(lag, timedelta) else 0.0
    return rows


def describe_seconds(seconds: float) -> str:
    """An age in a few characters: ``0.2s``, ``45s``, ``12m05s``, ``3h20m``, ``2d04h``.

    >>> describe_seconds(725.4)
    '12m05s'
    """
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def describe_limits(row: dict[str, Any]) -> str:
    """A queue's flow-control settings in a few words, "-" when it has none.

    >>> describe_limits({"concurrency_limit": 5, "rate_limit": 100,
    ...                  "rate_interval_seconds": 1.0, "max_depth": None})
    'concurrency 5, rate 100/1s'
    """
    parts = []
    if row.get("concurrency_limit") is not None:
        parts.append(f"concurrency {row['concurrency_limit']}")
    if row.get("rate_limit") is not None:
        interval = float(row.get("rate_interval_seconds") or 1.0)
        parts.append(f"rate {row['rate_limit']}/{interval:g}s")
    if row.get("max_depth") is not None:
        parts.append(f"max depth {row['max_depth']}")
    return ", ".join(parts) or "-"
