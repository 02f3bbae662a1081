"""Core: jobs, dead letters, queues, throughput, processes, and their views.

Revision ID: 0001_core
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

revision = "0001_core"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def _schema() -> str:
    from pgqueue.names import schema_name

    return schema_name(context.config.attributes.get("pgqueue_schema") or "pgqueue")


def upgrade() -> None:
    s = _schema()
    now = sa.text("now()")
    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True)),
        sa.Column("queue", sa.Text, nullable=False),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("args", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("headers", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("priority", sa.SmallInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'available'::text")),
        sa.Column("run_at", TZ, nullable=False, server_default=now),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("max_attempts", sa.Integer),
        sa.Column("timeout_seconds", sa.Double),
        sa.Column("ordering_key", sa.Text),
        sa.Column("key_seq", sa.BigInteger),
        sa.Column("unique_key", sa.Text),
        sa.Column("lease_token", pg.UUID),
        sa.Column("lease_expires_at", TZ),
        sa.Column("worker_id", pg.UUID),
        sa.Column("claimed_at", TZ),
        sa.Column("heartbeat_at", TZ),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", TZ, nullable=False, server_default=now),
        sa.PrimaryKeyConstraint("id", name="jobs_pkey"),
        sa.CheckConstraint("state IN ('available', 'running')", name="jobs_state_check"),
        sa.CheckConstraint(
            "max_attempts IS NULL OR max_attempts > 0", name="jobs_max_attempts_check"
        ),
        sa.CheckConstraint("attempts >= 0", name="jobs_attempts_check"),
        sa.CheckConstraint(
            "(state = 'running') = (lease_token IS NOT NULL)"
            " AND (state <> 'running' OR lease_expires_at IS NOT NULL)",
            name="jobs_running_lease_check",
        ),
        schema=s,
    )
    # The claim index matches the claim query's ORDER BY exactly, so a batch claim is a
    # short index range scan even before the table has ever been analyzed.
    op.create_index(
        "jobs_claim_idx",
        "jobs",
        ["queue", sa.text("priority DESC"), "run_at", "id"],
        schema=s,
        postgresql_where=sa.text("state = 'available'"),
    )
    # The one index of running jobs. Rescue reads it whole (running jobs are bounded by the
    # workers' slots) rather than keep a lease-expiry index: every claim would insert into
    # it, and every heartbeat too, where now a heartbeat can be a HOT update.
    op.create_index(
        "jobs_running_queue_idx",
        "jobs",
        ["queue", "id"],
        schema=s,
        postgresql_where=sa.text("state = 'running'"),
    )
    op.create_index(
        "jobs_ordering_key_idx",
        "jobs",
        ["queue", "ordering_key", "key_seq"],
        schema=s,
        postgresql_where=sa.text("ordering_key IS NOT NULL"),
    )
    op.create_index(
        "jobs_unique_key_idx",
        "jobs",
        ["queue", "unique_key"],
        unique=True,
        schema=s,
        postgresql_where=sa.text("unique_key IS NOT NULL"),
    )
    # Every job row is inserted, updated once or twice and deleted within seconds: vacuum
    # early and without cost-based sleeping so dead tuples never pile up in the hot table.
    op.execute(
        sa.text(
            f'ALTER TABLE "{s}".jobs SET (fillfactor = 85, '
            "autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000, "
            "autovacuum_vacuum_insert_scale_factor = 0.05, "
            "autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 1000, "
            "autovacuum_vacuum_cost_delay = 0)"
        )
    )

    op.create_table(
        "dead_jobs",
        sa.Column("id", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("queue", sa.Text, nullable=False),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("args", pg.JSONB, nullable=False),
        sa.Column("headers", pg.JSONB, nullable=False),
        sa.Column("priority", sa.SmallInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer),
        sa.Column("timeout_seconds", sa.Double),
        sa.Column("ordering_key", sa.Text),
        sa.Column("key_seq", sa.BigInteger),
        sa.Column("unique_key", sa.Text),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("worker_id", pg.UUID),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("failed_at", TZ, nullable=False, server_default=now),
        sa.PrimaryKeyConstraint("id", name="dead_jobs_pkey"),
        schema=s,
    )
    op.create_index("dead_jobs_queue_failed_idx", "dead_jobs", ["queue", "failed_at"], schema=s)
    op.create_index("dead_jobs_failed_idx", "dead_jobs", ["failed_at"], schema=s)

    op.create_table(
        "queues",
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("is_paused", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("concurrency_limit", sa.Integer),
        sa.Column("rate_limit", sa.Integer),
        sa.Column("rate_interval_seconds", sa.Double),
        sa.Column("max_depth", sa.Integer),
        sa.Column("created_at", TZ, nullable=False, server_default=now),
        sa.Column("updated_at", TZ, nullable=False, server_default=now),
        sa.PrimaryKeyConstraint("name", name="queues_pkey"),
        sa.CheckConstraint(
            "concurrency_limit IS NULL OR concurrency_limit > 0", name="queues_concurrency_check"
        ),
        sa.CheckConstraint("max_depth IS NULL OR max_depth > 0", name="queues_max_depth_check"),
        schema=s,
    )

    op.create_table(
        "queue_throughput",
        sa.Column("queue", sa.Text, nullable=False),
        sa.Column("minute", TZ, nullable=False),
        sa.Column("completed", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("retried", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("failed", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("queue", "minute", name="queue_throughput_pkey"),
        schema=s,
    )

    op.create_table(
        "processes",
        sa.Column("id", pg.UUID, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("queues", pg.ARRAY(sa.Text), nullable=False),
        sa.Column("concurrency", sa.Integer, nullable=False),
        sa.Column("started_at", TZ, nullable=False, server_default=now),
        sa.Column("heartbeat_at", TZ, nullable=False, server_default=now),
        sa.PrimaryKeyConstraint("id", name="processes_pkey"),
        sa.CheckConstraint("kind IN ('worker', 'relay')", name="processes_kind_check"),
        schema=s,
    )
    op.create_index("processes_heartbeat_idx", "processes", ["heartbeat_at"], schema=s)

    for statement in _views(s):
        op.execute(sa.text(statement))


def _views(s: str) -> list[str]:
    return [
        f"""
CREATE VIEW "{s}".queue_stats AS
WITH job_counts AS (
    SELECT queue,
           count(*) FILTER (WHERE state = 'available' AND run_at <= now()) AS ready,
           count(*) FILTER (WHERE state = 'available' AND run_at > now()) AS scheduled,
           count(*) FILTER (WHERE state = 'running') AS running,
           min(run_at) FILTER (WHERE state = 'available' AND run_at <= now()) AS oldest_ready_at
    FROM "{s}".jobs
    GROUP BY queue
), dead AS (
    SELECT queue, count(*) AS dead FROM "{s}".dead_jobs GROUP BY queue
), recent AS (
    SELECT queue,
           sum(completed) FILTER (WHERE minute >= date_trunc('minute', now()) - interval '1 minute')
               AS completed_last_minute,
           sum(failed) FILTER (WHERE minute >= date_trunc('minute', now()) - interval '1 minute')
               AS failed_last_minute,
           sum(completed) AS completed_last_hour,
           sum(failed) AS failed_last_hour,
           sum(retried) AS retried_last_hour
    FROM "{s}".queue_throughput
    WHERE minute >= now() - interval '1 hour'
    GROUP BY queue
), names AS (
    SELECT queue FROM job_counts
    UNION SELECT queue FROM dead
    UNION SELECT name FROM "{s}".queues
    UNION SELECT queue FROM recent
)
SELECT n.queue,
       coalesce(c.ready, 0) AS ready,
       coalesce(c.scheduled, 0) AS scheduled,
       coalesce(c.running, 0) AS running,
       coalesce(d.dead, 0) AS dead,
       greatest(now() - c.oldest_ready_at, interval '0') AS lag,
       coalesce(r.completed_last_minute, 0)::bigint AS completed_last_minute,
       coalesce(r.failed_last_minute, 0)::bigint AS failed_last_minute,
       coalesce(r.completed_last_hour, 0)::bigint AS completed_last_hour,
       coalesce(r.failed_last_hour, 0)::bigint AS failed_last_hour,
       coalesce(r.retried_last_hour, 0)::bigint AS retried_last_hour,
       coalesce(q.is_paused, false) AS is_paused,
       q.concurrency_limit,
       q.rate_limit,
       q.rate_interval_seconds,
       q.max_depth
FROM names n
LEFT JOIN job_counts c ON c.queue = n.queue
LEFT JOIN dead d ON d.queue = n.queue
LEFT JOIN recent r ON r.queue = n.queue
LEFT JOIN "{s}".queues q ON q.name = n.queue
""",
        f"""
CREATE VIEW "{s}".running_jobs AS
SELECT j.id AS job_id, j.queue, j.task, j.attempts AS attempt, j.max_attempts,
       j.worker_id, p.host AS worker_host, p.pid AS worker_pid,
       j.claimed_at AS started_at, j.lease_expires_at, j.heartbeat_at,
       now() - j.claimed_at AS running_for,
       j.ordering_key
FROM "{s}".jobs j
LEFT JOIN "{s}".processes p ON p.id = j.worker_id
WHERE j.state = 'running'
""",
        f"""
CREATE VIEW "{s}".dead_letters AS
SELECT id AS job_id, queue, task, attempts, max_attempts, reason,
       split_part(coalesce(last_error, ''), E'\\n', 1) AS error,
       failed_at, created_at, ordering_key, args
FROM "{s}".dead_jobs
""",
        f"""
CREATE VIEW "{s}".workers AS
SELECT id AS worker_id, kind, host, pid, queues, concurrency, started_at, heartbeat_at,
       now() - heartbeat_at AS since_heartbeat
FROM "{s}".processes
""",
    ]


def downgrade() -> None:
    s = _schema()
    for view in ("workers", "dead_letters", "running_jobs", "queue_stats"):
        op.execute(sa.text(f'DROP VIEW IF EXISTS "{s}".{view}'))
    for table in ("processes", "queue_throughput", "queues", "dead_jobs", "jobs"):
        op.drop_table(table, schema=s)
