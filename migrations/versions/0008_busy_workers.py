"""Busy workers: a one-job enqueue sends its NOTIFY only when a worker may be waiting for it.

Revision ID: 0008_busy_workers
Revises: 0007_lean_claim
Create Date: 2026-11-26

PostgreSQL serializes the commits of transactions that NOTIFY: each holds a database-wide
lock from just before its commit until the commit record is on disk. Many producers that
each enqueue one job then commit one at a time, however busy the workers are. On this
project's benchmark machine that took a third off the single-job enqueue rate (8 producers).

A worker that claimed full batches for a second, and so claims again without waiting for a
NOTIFY, now marks its process row busy (processes.busy_since), and clears the mark before it
next waits. enqueue_job skips its NOTIFY when the queue has worker rows and every one of
them is marked busy. The check is made after the job's row is written, so that a worker
that clears its mark meanwhile finds this transaction in progress or committed when it
looks (the worker's side of that protocol is in pgqueue/busy.py). A producer in REPEATABLE
READ or SERIALIZABLE, whose snapshot may be older than its INSERT, always notifies. No
mark means "may be waiting": a worker of an earlier version, a row re-inserted by a
heartbeat, and a worker just started are all notified as before; so is a queue with no
worker row at all.

The bulk, keyed and depth-limited paths (enqueue_jobs, prepare_bulk_enqueue) keep their
NOTIFY: one per transaction of many jobs, or rare.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from pgqueue.migrations.functions import earlier_definition

revision = "0008_busy_workers"
down_revision = "0007_lean_claim"
branch_labels = None
depends_on = None

ENQUEUE_JOB = "enqueue_job(text, text, jsonb, jsonb, smallint, timestamptz, float8, int, float8)"


def _schema() -> str:
    from pgqueue.names import schema_name

    return schema_name(context.config.attributes.get("pgqueue_schema") or "pgqueue")


def upgrade() -> None:
    s = _schema()
    op.execute(sa.text(f'ALTER TABLE "{s}".processes ADD COLUMN busy_since timestamptz'))
    for statement in _functions(s):
        op.execute(sa.text(statement))


def downgrade() -> None:
    s = _schema()
    # 0002's definition, read from that revision; CREATE OR REPLACE keeps the grants.
    previous = earlier_definition(s, "0002_flow_control.py", "enqueue_job")
    op.execute(sa.text(previous.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)))
    op.execute(sa.text(f'ALTER FUNCTION "{s}".{ENQUEUE_JOB} SECURITY DEFINER'))
    op.execute(sa.text(f'ALTER TABLE "{s}".processes DROP COLUMN busy_since'))


def _functions(s: str) -> list[str]:
    return [
        # As in 0002 (SECURITY DEFINER as 0004 made it), but for the NOTIFY's condition.
        f"""
CREATE OR REPLACE FUNCTION "{s}".enqueue_job(
    p_queue text, p_task text, p_args jsonb, p_headers jsonb, p_priority smallint,
    p_run_at timestamptz, p_delay float8, p_max_attempts int, p_timeout float8
) RETURNS TABLE (job_id bigint, status text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    depth int;
    run timestamptz := coalesce(p_run_at, now() + make_interval(secs => p_delay));
BEGIN
    SELECT q.max_depth INTO depth FROM "{s}".queues AS q WHERE q.name = p_queue;
    IF NOT FOUND THEN
        INSERT INTO "{s}".queues (name) VALUES (p_queue) ON CONFLICT (name) DO NOTHING;
    ELSIF depth IS NOT NULL THEN
        RETURN QUERY
        SELECT e.job_id, e.status
        FROM "{s}".enqueue_jobs(ARRAY[p_queue], ARRAY[p_task], ARRAY[p_args],
                                ARRAY[p_headers], ARRAY[p_priority], ARRAY[p_run_at],
                                ARRAY[p_delay], ARRAY[p_max_attempts], ARRAY[p_timeout],
                                ARRAY[NULL::text], ARRAY[NULL::text]) AS e;
        RETURN;
    END IF;
    INSERT INTO "{s}".jobs (queue, task, args, headers, priority, run_at, max_attempts,
                            timeout_seconds)
    VALUES (p_queue, p_task, p_args, p_headers, p_priority, run, p_max_attempts, p_timeout)
    RETURNING id INTO job_id;
    -- After the INSERT, in a statement of its own: under READ COMMITTED its snapshot is
    -- taken after this transaction got its id, so a worker that clears its busy mark
    -- after this check still finds this transaction in progress (pgqueue/busy.py). Under
    -- REPEATABLE READ or SERIALIZABLE the snapshot may predate the INSERT: always notify.
    -- No worker row at all is no proof that nobody listens (a live worker's row may have
    -- been pruned while its heartbeat stalled): notify then too.
    IF run <= now() AND (
        current_setting('transaction_isolation') <> 'read committed'
        OR NOT coalesce((SELECT bool_and(p.busy_since IS NOT NULL) FROM "{s}".processes AS p
                         WHERE p.kind = 'worker' AND p_queue = ANY(p.queues)), false)
    ) THEN
        PERFORM pg_notify('pgqueue_' || left(md5('{s}.' || p_queue), 24), '');
    END IF;
    -- The row is returned by assignment: a RETURN QUERY would start one more executor.
    status := 'inserted';
    RETURN NEXT;
END
$$"""
    ]
