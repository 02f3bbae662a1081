"""Least-privilege roles: the GRANTs for producer, worker, relay and reader, as reviewable SQL."""

from __future__ import annotations

from dataclasses import dataclass

from pgqueue.names import schema_name

ROLE_KINDS = ("producer", "worker", "relay", "reader")

_JOB_TABLES = ("jobs", "dead_jobs", "queues", "queue_throughput", "ordering_keys", "cron_ticks")
_OUTBOX_TABLES = ("outbox", "outbox_dead", "outbox_delivered", "outbox_throughput", "ordering_keys")
_VIEWS = (
    "queue_stats",
    "running_jobs",
    "dead_letters",
    "blocked_keys",
    "outbox_backlog",
    "workers",
    "health",
)
# Called by the views (queue_stats estimates deep counts); the caller needs EXECUTE.
_VIEW_FUNCTIONS = ("estimated_jobs(text, text)",)
_WORKER_FUNCTIONS = (
    "claim_jobs(text, int, uuid, float8, text[], int[], int, int, float8, bigint, boolean)",
    "claim_jobs(text, int, uuid, float8, text[], int[], int, int, float8, bigint)",  # older workers
    "complete_jobs(bigint[], uuid[])",
    "fail_jobs(bigint[], uuid[], text[], text[], boolean[])",
    "rescue_expired_jobs(int, int)",
    "advance_stalled_keys(int)",
    "job_key_advance(text, text)",
    "job_keys_advance(text[], text[])",
)
_RELAY_FUNCTIONS = (
    "claim_messages(int, uuid, float8)",
    "complete_messages(bigint[], uuid[], text[], boolean, uuid, float8)",
    "complete_messages(bigint[], uuid[], text[], boolean)",  # for relays of 0005's version
    "fail_messages(bigint[], uuid[], text[], text[], boolean[])",
    "rescue_expired_messages(int)",
    "outbox_key_advance(text)",
    "outbox_keys_advance(text[])",
    "outbox_keys_promote(text[], uuid, float8)",
)
_PRODUCER_FUNCTIONS = (
    "prepare_bulk_enqueue(text[], int[], text[], int)",
    "enqueue_job(text, text, jsonb, jsonb, smallint, timestamptz, float8, int, float8)",
    "enqueue_jobs(text[], text[], jsonb[], jsonb[], smallint[], timestamptz[], float8[], "
    "int[], float8[], text[], text[])",
    "publish_messages(text[], text[], jsonb[], jsonb[], float8[])",
)


@dataclass(frozen=True)
class RoleNames:
    """Database role names; defaults are ``<schema>_producer`` and so on."""

    producer: str
    worker: str
    relay: str
    reader: str

    @classmethod
    def for_schema(cls, schema: str, prefix: str | None = None) -> RoleNames:
        base = schema_name(prefix or schema)
        return cls(f"{base}_producer", f"{base}_worker", f"{base}_relay", f"{base}_reader")


def grants_sql(schema: str = "pgqueue", names: RoleNames | None = None) -> str:
    """The SQL that creates the four roles (NOLOGIN; grant them to your login roles) and
    grants each exactly what it needs. Safe to run again."""
    s = schema_name(schema)
    roles = names or RoleNames.for_schema(s)
    for role in (roles.producer, roles.worker, roles.relay, roles.reader):
        schema_name(role)
    q = f'"{s}"'
    lines = [
        f"-- pgqueue least-privilege roles for schema {s}. Review, then run as the schema owner.",
        "-- The roles cannot log in: GRANT them to your application's login roles.",
    ]
    for role in (roles.producer, roles.worker, roles.relay, roles.reader):
        lines.append(
            f"DO $$ BEGIN CREATE ROLE {role} NOLOGIN; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$;"
        )
        lines.append(f"GRANT USAGE ON SCHEMA {q} TO {role};")
    lines.append("-- producer: enqueue and publish only, through SECURITY DEFINER functions;")
    lines.append("-- it cannot read or change any table.")
    for function in _PRODUCER_FUNCTIONS:
        lines.append(f"GRANT EXECUTE ON FUNCTION {q}.{function} TO {roles.producer};")
    lines.append("-- worker: claim, settle and rescue jobs; register itself; periodic ticks.")
    tables = ", ".join(f"{q}.{t}" for t in (*_JOB_TABLES, "processes", "job_events"))
    lines.append(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {roles.worker};")
    lines.append(f"GRANT INSERT ON {q}.audit_log TO {roles.worker};")
    lines.append(f"GRANT SELECT ON {q}.queue_stats TO {roles.worker};")
    for function in (*_WORKER_FUNCTIONS, *_PRODUCER_FUNCTIONS, *_VIEW_FUNCTIONS):
        lines.append(f"GRANT EXECUTE ON FUNCTION {q}.{function} TO {roles.worker};")
    lines.append(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {q} TO {roles.worker};")
    lines.append("-- relay: claim, settle and rescue outbox messages; register itself.")
    tables = ", ".join(f"{q}.{t}" for t in (*_OUTBOX_TABLES, "processes"))
    lines.append(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {roles.relay};")
    for function in (*_RELAY_FUNCTIONS, *_PRODUCER_FUNCTIONS):
        lines.append(f"GRANT EXECUTE ON FUNCTION {q}.{function} TO {roles.relay};")
    lines.append(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {q} TO {roles.relay};")
    lines.append("-- reader: the views only (they run with the owner's rights).")
    views = ", ".join(f"{q}.{v}" for v in _VIEWS)
    lines.append(f"GRANT SELECT ON {views} TO {roles.reader};")
    for function in _VIEW_FUNCTIONS:
        lines.append(f"GRANT EXECUTE ON FUNCTION {q}.{function} TO {roles.reader};")
    lines.append(
        f"-- Optional: GRANT pg_read_all_stats TO {roles.reader}; lets pgqueue.health see the "
        "transaction ages of other roles' sessions."
    )
    return "\n".join(lines) + "\n"
