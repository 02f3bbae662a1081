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


def count_cells(row: dict[str, Any]) -> list[str]:
    """The five counts of a ``queue_stats`` row as the status table shows them.

    Past 2,000 available jobs ``ready`` and ``scheduled`` are both estimates (their sum is
    then above 2,000); ``running``, ``waiting`` and ``dead`` are estimates above 2,000. An
    estimate reads ``~N``; ``2001+`` is the floor of what was read, when the planner's
    statistics guessed lower.

    >>> count_cells({"ready": 1668, "scheduled": 3332, "running": 0, "waiting": 0,
    ...              "dead": 2, "counts_estimated": True})
    ['~1668', '~3332', '0', '0', '2']
    """
    estimated = bool(row.get("counts_estimated"))
    is_available_estimated = estimated and row["ready"] + row["scheduled"] > 2000
    cells = []
    for column in ESTIMATED_COUNTS:
        value = row[column]
        if column in ("ready", "scheduled"):
            is_estimate = is_available_estimated
        else:
            is_estimate = estimated and value > 2000
        if is_estimate and value == 2001:
            cells.append("2001+")
        elif is_estimate:
            cells.append(f"~{value}")
        else:
            cells.append(str(value))
    return cells


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
