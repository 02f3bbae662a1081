"""Operations: operator views, the audit trail, optional job event history, least privilege.

Revision ID: 0004_operations
Revises: 0003_outbox
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

revision = "0004_operations"
down_revision = "0003_outbox"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
VIEWS = (
    "health",
    "outbox_backlog",
    "blocked_keys",
    "workers",
    "dead_letters",
    "running_jobs",
    "queue_stats",
)


def _schema() -> str:
    from pgqueue.names import schema_name

    return schema_name(context.config.attributes.get("pgqueue_schema") or "pgqueue")


def upgrade() -> None:
    s = _schema()
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True)),
        sa.Column("at", TZ, nullable=False, server_default=sa.text("now()")),
        sa.Column("role", sa.Text, nullable=False, server_default=sa.text("current_user")),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("details", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.PrimaryKeyConstraint("id", name="audit_log_pkey"),
        schema=s,
    )
    op.create_index("audit_log_at_idx", "audit_log", ["at"], schema=s)
    op.create_table(
        "job_events",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True)),
        sa.Column("at", TZ, nullable=False, server_default=sa.text("now()")),
        sa.Column("job_id", sa.BigInteger, nullable=False),
        sa.Column("queue", sa.Text, nullable=False),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("worker_id", pg.UUID),
        sa.PrimaryKeyConstraint("id", name="job_events_pkey"),
        schema=s,
    )
    op.create_index("job_events_job_idx", "job_events", ["job_id", "id"], schema=s)
    op.create_index("job_events_at_idx", "job_events", ["at"], schema=s)
    # Appending to the audit trail is allowed; changing or deleting it is not, whoever asks.
    op.execute(
        sa.text(
            f"""
CREATE FUNCTION "{s}".audit_log_is_append_only() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'pgqueue.audit_log is append-only' USING ERRCODE = 'insufficient_privilege';
END
$$"""
        )
    )
    op.execute(
        sa.text(
            f"CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
            f'ON "{s}".audit_log '
            f'FOR EACH STATEMENT EXECUTE FUNCTION "{s}".audit_log_is_append_only()'
        )
    )
    # Job event history, off by default: `pgqueue audit job-events on` attaches these
    # statement-level triggers (transition tables: one INSERT per statement, not per row).
    op.execute(
        sa.text(
            f"""
CREATE FUNCTION "{s}".record_job_events() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO "{s}".job_events (job_id, queue, task, event, attempt, worker_id)
        SELECT id, queue, task, 'enqueued', attempts, NULL FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO "{s}".job_events (job_id, queue, task, event, attempt, worker_id)
        SELECT n.id, n.queue, n.task,
               CASE WHEN n.state = 'running' AND o.state <> 'running' THEN 'claimed'
                    WHEN n.state = 'available' AND o.state = 'running' THEN 'retried'
                    WHEN n.state = 'available' AND o.state = 'waiting' THEN 'unblocked'
               END,
               n.attempts, coalesce(n.worker_id, o.worker_id)
        FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
        WHERE n.state <> o.state;
    ELSE
        INSERT INTO "{s}".job_events (job_id, queue, task, event, attempt, worker_id)
        SELECT o.id, o.queue, o.task,
               CASE WHEN EXISTS (SELECT 1 FROM "{s}".dead_jobs AS d WHERE d.id = o.id)
                    THEN 'dead_lettered' ELSE 'completed' END,
               o.attempts, o.worker_id
        FROM old_rows AS o;
    END IF;
    RETURN NULL;
END
$$"""
        )
    )
    for statement in (*_operator_functions(s), *_estimates(s)):
        op.execute(sa.text(statement))
    _security(s)
    _create_views(s)


def _operator_functions(s: str) -> list[str]:
    return [
        f"""
CREATE FUNCTION "{s}".cancel_jobs(p_ids bigint[], p_reason text) RETURNS SETOF bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    gone_ids bigint[];
    key_queues text[];
    key_names text[];
    k record;
BEGIN
    WITH gone AS (
        DELETE FROM "{s}".jobs WHERE id = ANY(p_ids) RETURNING *
    ), moved AS (
        INSERT INTO "{s}".dead_jobs
            (id, queue, task, args, headers, priority, attempts, max_attempts,
             timeout_seconds, ordering_key, key_seq, unique_key, reason, last_error,
             worker_id, created_at, blocks_key)
        SELECT id, queue, task, args, headers, priority, attempts, max_attempts,
               timeout_seconds, ordering_key, key_seq, unique_key, 'cancelled',
               'cancelled by an operator: ' || p_reason
                   || coalesce(E'\nprevious error: ' || last_error, ''),
               worker_id, created_at, false
        FROM gone
    )
    SELECT array_agg(id),
           array_agg(queue) FILTER (WHERE ordering_key IS NOT NULL),
           array_agg(ordering_key) FILTER (WHERE ordering_key IS NOT NULL)
    INTO gone_ids, key_queues, key_names FROM gone;
    FOR k IN SELECT DISTINCT u.q, u.k FROM unnest(key_queues, key_names) AS u(q, k)
             ORDER BY u.q, u.k LOOP
        PERFORM "{s}".job_key_advance(k.q, k.k);
    END LOOP;
    RETURN QUERY SELECT unnest(gone_ids);
END
$$""",
        f"""
CREATE FUNCTION "{s}".requeue_dead_jobs(p_ids bigint[]) RETURNS SETOF bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    d "{s}".dead_jobs%ROWTYPE;
    is_active boolean;
BEGIN
    FOR d IN SELECT * FROM "{s}".dead_jobs WHERE id = ANY(p_ids)
             ORDER BY queue, ordering_key NULLS FIRST, key_seq, id
             FOR UPDATE SKIP LOCKED LOOP
        -- A live job already holds the unique key: leave this one in the dead letters.
        CONTINUE WHEN d.unique_key IS NOT NULL AND EXISTS (
            SELECT 1 FROM "{s}".jobs WHERE queue = d.queue AND unique_key = d.unique_key);
        is_active := false;
        IF d.ordering_key IS NOT NULL AND NOT d.blocks_key THEN
            -- It left its key's line: rejoin it behind the key's lock.
            INSERT INTO "{s}".ordering_keys AS k (scope, key, last_seq)
            VALUES ('job:' || d.queue, d.ordering_key, 0)
            ON CONFLICT (scope, key) DO UPDATE SET updated_at = now();
            SELECT EXISTS (SELECT 1 FROM "{s}".jobs
                           WHERE queue = d.queue AND ordering_key = d.ordering_key
                             AND state IN ('available', 'running'))
            INTO is_active;
        END IF;
        DELETE FROM "{s}".dead_jobs WHERE id = d.id;
        INSERT INTO "{s}".jobs
            (id, queue, task, args, headers, priority, run_at, attempts, max_attempts,
             timeout_seconds, ordering_key, key_seq, unique_key, state, last_error, created_at)
        OVERRIDING SYSTEM VALUE
        VALUES (d.id, d.queue, d.task, d.args, d.headers, d.priority, now(), 0,
                d.max_attempts, d.timeout_seconds, d.ordering_key, d.key_seq, d.unique_key,
                CASE WHEN is_active THEN 'waiting' ELSE 'available' END,
                d.last_error, d.created_at);
        PERFORM pg_notify('pgqueue_' || left(md5('{s}.' || d.queue), 24), '');
        RETURN NEXT d.id;
    END LOOP;
END
$$""",
        f"""
CREATE FUNCTION "{s}".purge_dead_jobs(p_ids bigint[]) RETURNS SETOF bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    gone_ids bigint[];
    key_queues text[];
    key_names text[];
    k record;
BEGIN
    WITH gone AS (
        DELETE FROM "{s}".dead_jobs WHERE id = ANY(p_ids) RETURNING *
    )
    SELECT array_agg(id),
           array_agg(queue) FILTER (WHERE blocks_key),
           array_agg(ordering_key) FILTER (WHERE blocks_key)
    INTO gone_ids, key_queues, key_names FROM gone;
    FOR k IN SELECT DISTINCT u.q, u.k FROM unnest(key_queues, key_names) AS u(q, k)
             ORDER BY u.q, u.k LOOP
        PERFORM "{s}".job_key_advance(k.q, k.k);
    END LOOP;
    RETURN QUERY SELECT unnest(gone_ids);
END
$$""",
    ]


def _estimates(s: str) -> list[str]:
    return [
        # Joint statistics of (queue, state): without them the planner multiplies the two
        # selectivities and misjudges a queue whose jobs are all in one state.
        f'CREATE STATISTICS "{s}".jobs_queue_state_stats (mcv) ON queue, state FROM "{s}".jobs',
        # The planner's row estimate for one queue's jobs in one state, for counts too deep
        # to read in full. Only these fixed statements can be explained; the queue name is a
        # quoted literal. SECURITY DEFINER: readers see the views, not the tables. Volatile,
        # as PostgreSQL requires of a function that runs EXPLAIN.
        f"""
CREATE FUNCTION "{s}".estimated_jobs(p_queue text, p_kind text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    statement text;
    plan json;
BEGIN
    statement := CASE p_kind
        WHEN 'ready' THEN format('SELECT 1 FROM "{s}".jobs WHERE queue = %L '
            'AND state = ''available'' AND run_at <= %L', p_queue, now())
        WHEN 'scheduled' THEN format('SELECT 1 FROM "{s}".jobs WHERE queue = %L '
            'AND state = ''available'' AND run_at > %L', p_queue, now())
        WHEN 'running' THEN format('SELECT 1 FROM "{s}".jobs WHERE queue = %L '
            'AND state = ''running''', p_queue)
        WHEN 'waiting' THEN format('SELECT 1 FROM "{s}".jobs WHERE queue = %L '
            'AND state = ''waiting''', p_queue)
        WHEN 'dead' THEN format('SELECT 1 FROM "{s}".dead_jobs WHERE queue = %L', p_queue)
    END;
    IF statement IS NULL THEN
        RAISE EXCEPTION 'estimated_jobs: unknown kind %', p_kind
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE 'EXPLAIN (FORMAT JSON) ' || statement INTO plan;
    RETURN (plan -> 0 -> 'Plan' ->> 'Plan Rows')::bigint;
END
$$""",
    ]


def _security(s: str) -> None:
    # Producers may only call these: they run with the owner's rights (search_path
    # pinned), so a producer role needs no privilege on the tables themselves.
    op.execute(
        sa.text(
            f'ALTER FUNCTION "{s}".enqueue_jobs(text[], text[], jsonb[], jsonb[], smallint[], '
            "timestamptz[], float8[], int[], float8[], text[], text[]) SECURITY DEFINER"
        )
    )
    op.execute(
        sa.text(
            f'ALTER FUNCTION "{s}".enqueue_job(text, text, jsonb, jsonb, smallint, timestamptz, '
            "float8, int, float8) SECURITY DEFINER"
        )
    )
    op.execute(
        sa.text(
            f'ALTER FUNCTION "{s}".publish_messages(text[], text[], jsonb[], jsonb[], float8[]) '
            "SECURITY DEFINER"
        )
    )
    op.execute(sa.text(f'REVOKE ALL ON ALL FUNCTIONS IN SCHEMA "{s}" FROM PUBLIC'))
    op.execute(sa.text(f'REVOKE ALL ON ALL TABLES IN SCHEMA "{s}" FROM PUBLIC'))
    op.execute(sa.text(f'REVOKE ALL ON SCHEMA "{s}" FROM PUBLIC'))
    op.execute(
        sa.text(f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{s}" REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC')
    )


def _create_views(s: str) -> None:
    op.execute(sa.text(f'DROP VIEW IF EXISTS "{s}".workers'))
    op.execute(sa.text(f'DROP VIEW IF EXISTS "{s}".dead_letters'))
    op.execute(sa.text(f'DROP VIEW IF EXISTS "{s}".running_jobs'))
    op.execute(sa.text(f'DROP VIEW IF EXISTS "{s}".queue_stats'))
    for statement in _views(s):
        op.execute(sa.text(statement))


def _views(s: str) -> list[str]:
    return [
        # One row per known queue. Each count reads at most 2,001 entries of one queue's
        # part of a partial index; past that the count is the planner's estimate (see
        # estimated_jobs), so the view answers in bounded time on any backlog. Each ORDER BY
        # is its index's order: it keeps the planner on an index scan that stops at the
        # limit even before the table is analyzed (a bitmap scan would read every entry
        # of the queue first). The lag walks
        # the claim index once per distinct priority: exact, whatever the depth.
        f"""
CREATE VIEW "{s}".queue_stats AS
SELECT q.name AS queue,
       CASE WHEN a.is_capped
            THEN greatest(a.ready, "{s}".estimated_jobs(q.name, 'ready')) ELSE a.ready END
           AS ready,
       CASE WHEN a.is_capped
            THEN greatest(a.scheduled, "{s}".estimated_jobs(q.name, 'scheduled'))
            ELSE a.scheduled END AS scheduled,
       CASE WHEN r.running > 2000
            THEN greatest(r.running, "{s}".estimated_jobs(q.name, 'running'))
            ELSE r.running END AS running,
       CASE WHEN w.waiting > 2000
            THEN greatest(w.waiting, "{s}".estimated_jobs(q.name, 'waiting'))
            ELSE w.waiting END AS waiting,
       CASE WHEN d.dead > 2000
            THEN greatest(d.dead, "{s}".estimated_jobs(q.name, 'dead')) ELSE d.dead END AS dead,
       greatest(now() - o.oldest_ready_at, interval '0') AS lag,
       coalesce(t.completed_last_minute, 0)::bigint AS completed_last_minute,
       coalesce(t.failed_last_minute, 0)::bigint AS failed_last_minute,
       coalesce(t.completed_last_hour, 0)::bigint AS completed_last_hour,
       coalesce(t.failed_last_hour, 0)::bigint AS failed_last_hour,
       coalesce(t.retried_last_hour, 0)::bigint AS retried_last_hour,
       q.is_paused, q.concurrency_limit, q.rate_limit, q.rate_interval_seconds, q.max_depth,
       a.is_capped OR r.running > 2000 OR w.waiting > 2000 OR d.dead > 2000
           AS counts_estimated
-- The queues come as an array, which the planner always counts as ten rows. Read from
-- the table before it is analyzed, they are costed at hundreds of rows; the plan then
-- crosses jit_above_cost and spends ~200 ms compiling itself (PG 15 built with LLVM).
FROM unnest(ARRAY(SELECT x FROM "{s}".queues AS x)) AS q
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE c.run_at <= now()) AS ready,
           count(*) FILTER (WHERE c.run_at > now()) AS scheduled,
           count(*) > 2000 AS is_capped
    FROM (SELECT j.run_at FROM "{s}".jobs AS j
          WHERE j.queue = q.name AND j.state = 'available'
          ORDER BY j.priority DESC, j.run_at, j.id LIMIT 2001) AS c
) AS a
CROSS JOIN LATERAL (
    SELECT count(*) AS running FROM (SELECT 1 FROM "{s}".jobs AS j
        WHERE j.queue = q.name AND j.state = 'running' ORDER BY j.id LIMIT 2001) AS c
) AS r
CROSS JOIN LATERAL (
    SELECT count(*) AS waiting FROM (SELECT 1 FROM "{s}".jobs AS j
        WHERE j.queue = q.name AND j.state = 'waiting'
        ORDER BY j.ordering_key, j.key_seq LIMIT 2001) AS c
) AS w
CROSS JOIN LATERAL (
    SELECT count(*) AS dead FROM (SELECT 1 FROM "{s}".dead_jobs AS x
        WHERE x.queue = q.name ORDER BY x.failed_at LIMIT 2001) AS c
) AS d
CROSS JOIN LATERAL (
    -- The first claim-index entry of each priority is that priority's oldest job: one
    -- index probe per distinct priority instead of a walk over the whole backlog.
    WITH RECURSIVE heads AS (
        (SELECT j.priority, j.run_at FROM "{s}".jobs AS j
         WHERE j.queue = q.name AND j.state = 'available'
         ORDER BY j.priority DESC, j.run_at, j.id LIMIT 1)
        UNION ALL
        SELECT n.priority, n.run_at FROM heads AS h CROSS JOIN LATERAL (
            SELECT j.priority, j.run_at FROM "{s}".jobs AS j
            WHERE j.queue = q.name AND j.state = 'available' AND j.priority < h.priority
            ORDER BY j.priority DESC, j.run_at, j.id LIMIT 1) AS n
    )
    SELECT min(h.run_at) FILTER (WHERE h.run_at <= now()) AS oldest_ready_at FROM heads AS h
) AS o
LEFT JOIN LATERAL (
    SELECT sum(p.completed) FILTER (WHERE p.minute >= date_trunc('minute', now()) - interval '1 minute')
               AS completed_last_minute,
           sum(p.failed) FILTER (WHERE p.minute >= date_trunc('minute', now()) - interval '1 minute')
               AS failed_last_minute,
           sum(p.completed) AS completed_last_hour,
           sum(p.failed) AS failed_last_hour,
           sum(p.retried) AS retried_last_hour
    FROM "{s}".queue_throughput AS p
    WHERE p.queue = q.name AND p.minute >= now() - interval '1 hour'
) AS t ON true
""",
        f"""
CREATE VIEW "{s}".running_jobs AS
SELECT j.id AS job_id, j.queue, j.task, j.attempts AS attempt, j.max_attempts,
       j.worker_id, p.host AS worker_host, p.pid AS worker_pid,
       j.claimed_at AS started_at, j.lease_expires_at, j.heartbeat_at,
       now() - j.claimed_at AS running_for,
       j.lease_expires_at < now() AS is_lease_expired,
       j.ordering_key
FROM "{s}".jobs AS j
LEFT JOIN "{s}".processes AS p ON p.id = j.worker_id
WHERE j.state = 'running'
""",
        f"""
CREATE VIEW "{s}".dead_letters AS
SELECT id AS job_id, queue, task, attempts, max_attempts, reason,
       split_part(coalesce(last_error, ''), E'\\n', 1) AS error,
       failed_at, created_at, ordering_key, blocks_key, args
FROM "{s}".dead_jobs
""",
        f"""
CREATE VIEW "{s}".workers AS
SELECT id AS worker_id, kind, host, pid, queues, concurrency, started_at, heartbeat_at,
       now() - heartbeat_at AS since_heartbeat,
       heartbeat_at > now() - interval '90 seconds' AS is_alive
FROM "{s}".processes
""",
        f"""
CREATE VIEW "{s}".blocked_keys AS
SELECT 'job'::text AS kind, d.queue, d.ordering_key AS key, 'dead'::text AS reason,
       d.id AS head_id, d.task AS head_task, d.attempts,
       split_part(coalesce(d.last_error, ''), E'\\n', 1) AS error, d.failed_at AS since,
       (SELECT count(*) FROM "{s}".jobs AS w
        WHERE w.queue = d.queue AND w.ordering_key = d.ordering_key AND w.state = 'waiting')
           AS waiting
FROM "{s}".dead_jobs AS d
WHERE d.blocks_key
UNION ALL
SELECT 'job', j.queue, j.ordering_key, 'retrying', j.id, j.task, j.attempts,
       split_part(coalesce(j.last_error, ''), E'\\n', 1), j.run_at,
       (SELECT count(*) FROM "{s}".jobs AS w
        WHERE w.queue = j.queue AND w.ordering_key = j.ordering_key AND w.state = 'waiting')
FROM "{s}".jobs AS j
WHERE j.ordering_key IS NOT NULL AND j.state IN ('available', 'running')
  AND j.attempts > 0 AND j.run_at > now()
UNION ALL
SELECT 'outbox', NULL, d.key, 'dead', d.id, d.topic, d.attempts,
       split_part(coalesce(d.last_error, ''), E'\\n', 1), d.failed_at,
       (SELECT count(*) FROM "{s}".outbox AS w WHERE w.key = d.key AND w.state = 'waiting')
FROM "{s}".outbox_dead AS d
WHERE d.blocks_key
UNION ALL
SELECT 'outbox', NULL, o.key, 'retrying', o.id, o.topic, o.attempts,
       split_part(coalesce(o.last_error, ''), E'\\n', 1), o.available_at,
       (SELECT count(*) FROM "{s}".outbox AS w WHERE w.key = o.key AND w.state = 'waiting')
FROM "{s}".outbox AS o
WHERE o.key IS NOT NULL AND o.state IN ('pending', 'inflight')
  AND o.attempts > 0 AND o.available_at > now()
""",
        f"""
CREATE VIEW "{s}".outbox_backlog AS
WITH live AS (
    SELECT topic,
           count(*) FILTER (WHERE state = 'pending') AS pending,
           count(*) FILTER (WHERE state = 'waiting') AS waiting,
           count(*) FILTER (WHERE state = 'inflight') AS in_flight,
           min(created_at) FILTER (WHERE state = 'pending' AND available_at <= now())
               AS oldest_pending_at
    FROM "{s}".outbox GROUP BY topic
), dead AS (
    SELECT topic, count(*) AS dead FROM "{s}".outbox_dead GROUP BY topic
)
SELECT coalesce(l.topic, d.topic) AS topic,
       coalesce(l.pending, 0) AS pending, coalesce(l.waiting, 0) AS waiting,
       coalesce(l.in_flight, 0) AS in_flight, coalesce(d.dead, 0) AS dead,
       greatest(now() - l.oldest_pending_at, interval '0') AS oldest_pending_age
FROM live AS l FULL JOIN dead AS d ON d.topic = l.topic
""",
        # One row. verdict is 'ok', 'warning' or 'critical'; reasons says why.
        f"""
CREATE VIEW "{s}".health AS
WITH activity AS (
    SELECT max(now() - xact_start) FILTER (WHERE state <> 'idle') AS oldest_transaction_age,
           max(greatest(age(backend_xmin), age(backend_xid))) AS oldest_xmin_age
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
), tables AS (
    SELECT max(n_dead_tup) FILTER (WHERE relname = 'jobs') AS jobs_dead_tuples,
           max(n_live_tup) FILTER (WHERE relname = 'jobs') AS jobs_live_tuples,
           max(greatest(last_autovacuum, last_vacuum)) FILTER (WHERE relname = 'jobs')
               AS jobs_last_vacuum,
           max(n_dead_tup) FILTER (WHERE relname = 'outbox') AS outbox_dead_tuples,
           max(greatest(last_autovacuum, last_vacuum)) FILTER (WHERE relname = 'outbox')
               AS outbox_last_vacuum
    FROM pg_stat_user_tables WHERE schemaname = '{s}'
), relay AS (
    SELECT greatest(now() - min(created_at), interval '0') AS relay_lag
    FROM "{s}".outbox WHERE state = 'pending' AND available_at <= now()
), workers AS (
    SELECT count(*) FILTER (WHERE heartbeat_at > now() - interval '90 seconds') AS live_workers
    FROM "{s}".processes
), facts AS (
    SELECT * FROM activity, tables, relay, workers
)
SELECT f.*,
       CASE WHEN f.oldest_transaction_age > interval '1 hour'
                 OR f.relay_lag > interval '15 minutes'
                 OR coalesce(f.jobs_dead_tuples, 0) > 10 * greatest(coalesce(f.jobs_live_tuples, 0), 100000)
            THEN 'critical'
            WHEN f.oldest_transaction_age > interval '5 minutes'
                 OR f.relay_lag > interval '1 minute'
                 OR coalesce(f.jobs_dead_tuples, 0) > greatest(coalesce(f.jobs_live_tuples, 0), 100000)
            THEN 'warning'
            ELSE 'ok' END AS verdict,
       concat_ws('; ',
           CASE WHEN f.oldest_transaction_age > interval '5 minutes' THEN
               'a transaction has been open for ' || date_trunc('second', f.oldest_transaction_age)
               || ': it holds back vacuum of the queue tables' END,
           CASE WHEN f.relay_lag > interval '1 minute' THEN
               'the oldest undelivered outbox message waits since ' || date_trunc('second', f.relay_lag) END,
           CASE WHEN coalesce(f.jobs_dead_tuples, 0) > greatest(coalesce(f.jobs_live_tuples, 0), 100000) THEN
               'pgqueue.jobs has ' || f.jobs_dead_tuples || ' dead tuples: vacuum is falling behind' END
       ) AS reasons
FROM facts AS f
""",
    ]


def downgrade() -> None:
    s = _schema()
    for view in VIEWS:
        op.execute(sa.text(f'DROP VIEW IF EXISTS "{s}".{view}'))
    op.execute(sa.text(f'DROP TRIGGER IF EXISTS audit_log_append_only ON "{s}".audit_log'))
    op.execute(sa.text(f'DROP FUNCTION IF EXISTS "{s}".audit_log_is_append_only()'))
    op.execute(sa.text(f'DROP FUNCTION IF EXISTS "{s}".record_job_events()'))
    for function in (
        "cancel_jobs(bigint[], text)",
        "requeue_dead_jobs(bigint[])",
        "purge_dead_jobs(bigint[])",
        "estimated_jobs(text, text)",
    ):
        op.execute(sa.text(f'DROP FUNCTION IF EXISTS "{s}".{function}'))
    op.execute(sa.text(f'DROP STATISTICS IF EXISTS "{s}".jobs_queue_state_stats'))
    op.drop_table("job_events", schema=s)
    op.drop_table("audit_log", schema=s)
