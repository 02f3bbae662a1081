"""The tables of pgqueue, declared once (SQLAlchemy Core); revisions are checked against them."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.sql.elements import TextClause

from pgqueue.names import schema_name

DEFAULT_SCHEMA = "pgqueue"
VERSION_TABLE = "schema_version"


def _now() -> TextClause:
    return text("now()")


def build_metadata(schema: str = DEFAULT_SCHEMA) -> MetaData:
    """Return the pgqueue tables in ``schema`` (validated against the allow-list)."""
    schema = schema_name(schema)
    metadata = MetaData(schema=schema)
    tz = DateTime(timezone=True)

    Table(
        "jobs",
        metadata,
        Column("id", BigInteger, Identity(always=True)),
        Column("queue", Text, nullable=False),
        Column("task", Text, nullable=False),
        Column("args", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        Column("priority", SmallInteger, nullable=False, server_default=text("0")),
        Column("state", Text, nullable=False, server_default=text("'available'::text")),
        Column("run_at", tz, nullable=False, server_default=_now()),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("max_attempts", Integer),
        Column("timeout_seconds", Double),
        Column("ordering_key", Text),
        Column("key_seq", BigInteger),
        Column("unique_key", Text),
        Column("lease_token", UUID),
        Column("lease_expires_at", tz),
        Column("worker_id", UUID),
        Column("claimed_at", tz),
        Column("heartbeat_at", tz),
        Column("last_error", Text),
        Column("created_at", tz, nullable=False, server_default=_now()),
        PrimaryKeyConstraint("id", name="jobs_pkey"),
        CheckConstraint("state IN ('available', 'running', 'waiting')", name="jobs_state_check"),
        CheckConstraint("pg_column_size(args) <= 262144", name="jobs_args_size_check"),
        CheckConstraint("max_attempts IS NULL OR max_attempts > 0", name="jobs_max_attempts_check"),
        CheckConstraint("attempts >= 0", name="jobs_attempts_check"),
        CheckConstraint(
            "(state = 'running') = (lease_token IS NOT NULL)"
            " AND (state <> 'running' OR lease_expires_at IS NOT NULL)",
            name="jobs_running_lease_check",
        ),
        Index(
            "jobs_claim_idx",
            "queue",
            text("priority DESC"),
            "run_at",
            "id",
            postgresql_where=text("state = 'available'"),
        ),
        Index(
            "jobs_running_queue_idx",
            "queue",
            "id",
            postgresql_where=text("state = 'running'"),
        ),
        Index(
            "jobs_key_active_idx",
            "queue",
            "ordering_key",
            postgresql_where=text("ordering_key IS NOT NULL AND state IN ('available', 'running')"),
        ),
        Index(
            "jobs_key_waiting_idx",
            "queue",
            "ordering_key",
            "key_seq",
            postgresql_where=text("state = 'waiting'"),
        ),
        Index(
            "jobs_unique_key_idx",
            "queue",
            "unique_key",
            unique=True,
            postgresql_where=text("unique_key IS NOT NULL"),
        ),
    )

    Table(
        "dead_jobs",
        metadata,
        Column("id", BigInteger, nullable=False, autoincrement=False),
        Column("queue", Text, nullable=False),
        Column("task", Text, nullable=False),
        Column("args", JSONB, nullable=False),
        Column("headers", JSONB, nullable=False),
        Column("priority", SmallInteger, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("max_attempts", Integer),
        Column("timeout_seconds", Double),
        Column("ordering_key", Text),
        Column("key_seq", BigInteger),
        Column("unique_key", Text),
        Column("reason", Text, nullable=False),
        Column("last_error", Text),
        Column("worker_id", UUID),
        Column("created_at", tz, nullable=False),
        Column("failed_at", tz, nullable=False, server_default=_now()),
        Column("blocks_key", Boolean, nullable=False, server_default=text("false")),
        PrimaryKeyConstraint("id", name="dead_jobs_pkey"),
        Index("dead_jobs_key_idx", "queue", "ordering_key", postgresql_where=text("blocks_key")),
        Index("dead_jobs_queue_failed_idx", "queue", "failed_at"),
        Index("dead_jobs_failed_idx", "failed_at"),
    )

    Table(
        "queues",
        metadata,
        Column("name", Text, nullable=False),
        Column("is_paused", Boolean, nullable=False, server_default=text("false")),
        Column("concurrency_limit", Integer),
        Column("rate_limit", Integer),
        Column("rate_interval_seconds", Double),
        Column("max_depth", Integer),
        Column("created_at", tz, nullable=False, server_default=_now()),
        Column("rate_tokens", Double),
        Column("rate_updated_at", tz),
        Column("updated_at", tz, nullable=False, server_default=_now()),
        PrimaryKeyConstraint("name", name="queues_pkey"),
        CheckConstraint(
            "concurrency_limit IS NULL OR concurrency_limit > 0", name="queues_concurrency_check"
        ),
        CheckConstraint("max_depth IS NULL OR max_depth > 0", name="queues_max_depth_check"),
    )

    Table(
        "queue_throughput",
        metadata,
        Column("queue", Text, nullable=False),
        Column("minute", tz, nullable=False),
        Column("completed", BigInteger, nullable=False, server_default=text("0")),
        Column("retried", BigInteger, nullable=False, server_default=text("0")),
        Column("failed", BigInteger, nullable=False, server_default=text("0")),
        PrimaryKeyConstraint("queue", "minute", name="queue_throughput_pkey"),
    )

    Table(
        "ordering_keys",
        metadata,
        Column("scope", Text, nullable=False),
        Column("key", Text, nullable=False),
        Column("last_seq", BigInteger, nullable=False, server_default=text("0")),
        Column("updated_at", tz, nullable=False, server_default=_now()),
        PrimaryKeyConstraint("scope", "key", name="ordering_keys_pkey"),
    )

    Table(
        "cron_ticks",
        metadata,
        Column("name", Text, nullable=False),
        Column("tick_at", tz, nullable=False),
        Column("job_id", BigInteger),
        Column("enqueued_at", tz, nullable=False, server_default=_now()),
        PrimaryKeyConstraint("name", "tick_at", name="cron_ticks_pkey"),
    )

    Table(
        "processes",
        metadata,
        Column("id", UUID, nullable=False),
        Column("kind", Text, nullable=False),
        Column("host", Text, nullable=False),
        Column("pid", Integer, nullable=False),
        Column("queues", ARRAY(Text), nullable=False),
        Column("concurrency", Integer, nullable=False),
        Column("started_at", tz, nullable=False, server_default=_now()),
        Column("heartbeat_at", tz, nullable=False, server_default=_now()),
        # Set while a worker claims full batches and would not wait for a NOTIFY; a
        # one-job enqueue skips its NOTIFY when the queue has workers and all are busy.
        Column("busy_since", tz),
        PrimaryKeyConstraint("id", name="processes_pkey"),
        CheckConstraint("kind IN ('worker', 'relay')", name="processes_kind_check"),
        Index("processes_heartbeat_idx", "heartbeat_at"),
    )
    Table(
        "outbox",
        metadata,
        Column("id", BigInteger, Identity(always=True)),
        Column("message_id", UUID, nullable=False, server_default=text("gen_random_uuid()")),
        Column("topic", Text, nullable=False),
        Column("key", Text),
        Column("key_seq", BigInteger),
        Column("payload", JSONB, nullable=False),
        Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        Column("state", Text, nullable=False, server_default=text("'pending'::text")),
        Column("available_at", tz, nullable=False, server_default=_now()),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("lease_token", UUID),
        Column("lease_expires_at", tz),
        Column("relay_id", UUID),
        Column("claimed_at", tz),
        Column("last_error", Text),
        Column("created_at", tz, nullable=False, server_default=_now()),
        PrimaryKeyConstraint("id", name="outbox_pkey"),
        CheckConstraint("state IN ('pending', 'inflight', 'waiting')", name="outbox_state_check"),
        CheckConstraint("pg_column_size(payload) <= 262144", name="outbox_payload_size_check"),
        CheckConstraint(
            "(state = 'inflight') = (lease_token IS NOT NULL)"
            " AND (state <> 'inflight' OR lease_expires_at IS NOT NULL)",
            name="outbox_inflight_lease_check",
        ),
        Index("outbox_claim_idx", "available_at", "id", postgresql_where=text("state = 'pending'")),
        Index("outbox_lease_idx", "lease_expires_at", postgresql_where=text("state = 'inflight'")),
        Index(
            "outbox_key_active_idx",
            "key",
            postgresql_where=text("key IS NOT NULL AND state IN ('pending', 'inflight')"),
        ),
        Index(
            "outbox_key_waiting_idx", "key", "key_seq", postgresql_where=text("state = 'waiting'")
        ),
    )

    Table(
        "outbox_dead",
        metadata,
        Column("id", BigInteger, nullable=False, autoincrement=False),
        Column("message_id", UUID, nullable=False),
        Column("topic", Text, nullable=False),
        Column("key", Text),
        Column("key_seq", BigInteger),
        Column("payload", JSONB, nullable=False),
        Column("headers", JSONB, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("reason", Text, nullable=False),
        Column("last_error", Text),
        Column("blocks_key", Boolean, nullable=False, server_default=text("false")),
        Column("created_at", tz, nullable=False),
        Column("failed_at", tz, nullable=False, server_default=_now()),
        PrimaryKeyConstraint("id", name="outbox_dead_pkey"),
        Index("outbox_dead_failed_idx", "failed_at"),
        Index("outbox_dead_key_idx", "key", postgresql_where=text("blocks_key")),
    )

    Table(
        "outbox_delivered",
        metadata,
        Column("id", BigInteger, nullable=False, autoincrement=False),
        Column("message_id", UUID, nullable=False),
        Column("topic", Text, nullable=False),
        Column("key", Text),
        Column("payload", JSONB, nullable=False),
        Column("headers", JSONB, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("sink", Text),
        Column("created_at", tz, nullable=False),
        Column("delivered_at", tz, nullable=False, server_default=_now()),
        PrimaryKeyConstraint("id", name="outbox_delivered_pkey"),
        Index("outbox_delivered_at_idx", "delivered_at"),
    )

    Table(
        "outbox_throughput",
        metadata,
        Column("topic", Text, nullable=False),
        Column("minute", tz, nullable=False),
        Column("delivered", BigInteger, nullable=False, server_default=text("0")),
        Column("failed", BigInteger, nullable=False, server_default=text("0")),
        PrimaryKeyConstraint("topic", "minute", name="outbox_throughput_pkey"),
    )
    Table(
        "audit_log",
        metadata,
        Column("id", BigInteger, Identity(always=True)),
        Column("at", tz, nullable=False, server_default=_now()),
        Column("role", Text, nullable=False, server_default=text("CURRENT_USER")),
        Column("action", Text, nullable=False),
        Column("target", Text, nullable=False),
        Column("count", BigInteger, nullable=False),
        Column("details", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        PrimaryKeyConstraint("id", name="audit_log_pkey"),
        Index("audit_log_at_idx", "at"),
    )

    Table(
        "job_events",
        metadata,
        Column("id", BigInteger, Identity(always=True)),
        Column("at", tz, nullable=False, server_default=_now()),
        Column("job_id", BigInteger, nullable=False),
        Column("queue", Text, nullable=False),
        Column("task", Text, nullable=False),
        Column("event", Text, nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("worker_id", UUID),
        PrimaryKeyConstraint("id", name="job_events_pkey"),
        Index("job_events_job_idx", "job_id", "id"),
        Index("job_events_at_idx", "at"),
    )
    return metadata
