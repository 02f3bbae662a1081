"""Flow control: ordering keys, unique keys, limits and rate limits, max depth, cron ticks.

Revision ID: 0002_flow_control
Revises: 0001_core
Create Date: 2026-11-25

The functions below are PL/pgSQL on purpose: under READ COMMITTED each statement inside a
function takes a fresh snapshot, so a statement that runs after waiting for a lock sees
what the lock holder committed. Single SQL statements (and their CTEs) cannot.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0002_flow_control"
down_revision = "0001_core"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def _schema() -> str:
    from pgqueue.names import schema_name

    return schema_name(context.config.attributes.get("pgqueue_schema") or "pgqueue")


def upgrade() -> None:
    s = _schema()
    op.drop_constraint("jobs_state_check", "jobs", schema=s)
    op.create_check_constraint(
        "jobs_state_check", "jobs", "state IN ('available', 'running', 'waiting')", schema=s
    )
    op.create_check_constraint(
        "jobs_args_size_check", "jobs", "pg_column_size(args) <= 262144", schema=s
    )
    op.drop_index("jobs_ordering_key_idx", "jobs", schema=s)
    op.create_index(
        "jobs_key_active_idx",
        "jobs",
        ["queue", "ordering_key"],
        schema=s,
        postgresql_where=sa.text("ordering_key IS NOT NULL AND state IN ('available', 'running')"),
    )
    op.create_index(
        "jobs_key_waiting_idx",
        "jobs",
        ["queue", "ordering_key", "key_seq"],
        schema=s,
        postgresql_where=sa.text("state = 'waiting'"),
    )
    op.add_column(
        "dead_jobs",
        sa.Column("blocks_key", sa.Boolean, nullable=False, server_default=sa.text("false")),
        schema=s,
    )
    op.create_index(
        "dead_jobs_key_idx",
        "dead_jobs",
        ["queue", "ordering_key"],
        schema=s,
        postgresql_where=sa.text("blocks_key"),
    )
    op.add_column("queues", sa.Column("rate_tokens", sa.Double), schema=s)
    op.add_column("queues", sa.Column("rate_updated_at", TZ), schema=s)
    op.create_check_constraint(
        "queues_rate_check",
        "queues",
        "(rate_limit IS NULL) = (rate_interval_seconds IS NULL) "
        "AND (rate_limit IS NULL OR (rate_limit > 0 AND rate_interval_seconds > 0))",
        schema=s,
    )
    op.create_table(
        "ordering_keys",
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("updated_at", TZ, nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("scope", "key", name="ordering_keys_pkey"),
        schema=s,
    )
    op.create_table(
        "cron_ticks",
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("tick_at", TZ, nullable=False),
        sa.Column("job_id", sa.BigInteger),
        sa.Column("enqueued_at", TZ, nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("name", "tick_at", name="cron_ticks_pkey"),
        schema=s,
    )
    for statement in _functions(s):
        op.execute(sa.text(statement))


def _functions(s: str) -> list[str]:
    return [
        # Promote the next waiting job of a key when nothing of the key is active any more.
        # Callers lock nothing first: this takes the key row lock itself, and its later
        # statements see everything committed by enqueuers that held that lock before.
        f"""
CREATE FUNCTION "{s}".job_keys_advance(p_queues text[], p_keys text[]) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    promoted bigint;
    woken_queues bigint;
BEGIN
    -- Lock (and bump, so a REPEATABLE READ enqueuer racing with us gets a serialization
    -- error instead of parking a job behind a head that is gone) in one order...
    UPDATE "{s}".ordering_keys SET updated_at = now()
    WHERE (scope, key) IN (
        SELECT k.scope, k.key FROM "{s}".ordering_keys AS k
        JOIN unnest(p_queues, p_keys) AS u(queue, key)
          ON k.scope = 'job:' || u.queue AND k.key = u.key
        ORDER BY k.scope, k.key FOR UPDATE OF k);
    -- ...then, with a snapshot taken after the locks, promote each idle key's next job.
    WITH heads AS (
        SELECT h.id, h.queue
        FROM (SELECT DISTINCT u.queue, u.key FROM unnest(p_queues, p_keys) AS u(queue, key)) AS k
        CROSS JOIN LATERAL (
            SELECT j.id, j.queue FROM "{s}".jobs AS j
            WHERE j.queue = k.queue AND j.ordering_key = k.key AND j.state = 'waiting'
            ORDER BY j.key_seq LIMIT 1
        ) AS h
        WHERE NOT EXISTS (SELECT 1 FROM "{s}".jobs AS a
                          WHERE a.queue = k.queue AND a.ordering_key = k.key
                            AND a.state IN ('available', 'running'))
          AND NOT EXISTS (SELECT 1 FROM "{s}".dead_jobs AS d
                          WHERE d.queue = k.queue AND d.ordering_key = k.key AND d.blocks_key)
    ), moved AS (
        UPDATE "{s}".jobs AS j SET state = 'available'
        WHERE j.id IN (SELECT id FROM heads)
        RETURNING j.queue
    ), woken AS MATERIALIZED (
        SELECT pg_notify('pgqueue_' || left(md5('{s}.' || q.queue), 24), '')::text AS signal
        FROM (SELECT DISTINCT queue FROM moved) AS q
    )
    SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM woken) INTO promoted, woken_queues;
    RETURN promoted;
END
$$""",
        # Promote the next waiting job of one key when nothing of the key is active any more.
        f"""
CREATE FUNCTION "{s}".job_key_advance(p_queue text, p_key text) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- Returns the promoted job's id, or NULL when the key stays as it is.
    IF "{s}".job_keys_advance(ARRAY[p_queue], ARRAY[p_key]) = 0 THEN
        RETURN NULL;
    END IF;
    RETURN (SELECT id FROM "{s}".jobs
            WHERE queue = p_queue AND ordering_key = p_key AND state = 'available'
            ORDER BY key_seq LIMIT 1);
END
$$""",
        # Enqueue any mix of jobs: plain ones in one INSERT, keyed or unique ones one by one.
        # Returns one row per input position: the job id and 'inserted', 'duplicate' or
        # 'queue_full'. A full queue inserts nothing at all for the call.
        f"""
CREATE FUNCTION "{s}".enqueue_jobs(
    p_queue text[], p_task text[], p_args jsonb[], p_headers jsonb[], p_priority smallint[],
    p_run_at timestamptz[], p_delay float8[], p_max_attempts int[], p_timeout float8[],
    p_ordering_key text[], p_unique_key text[]
) RETURNS TABLE (pos bigint, job_id bigint, status text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    r record;
    new_seq bigint;
    new_id bigint;
    is_active boolean;
    full_queue text;
    key_queues text[];
    key_names text[];
    key_tops bigint[];
    mixed_keys text[];
    id_sequence regclass := pg_get_serial_sequence('"{s}".jobs', 'id')::regclass;
BEGIN
    -- Backpressure first, so a full queue leaves the caller's transaction untouched.
    -- Enqueuers of a depth-limited queue serialize on an advisory lock until they commit
    -- (workers' claims do not take it), so concurrent callers cannot overshoot the limit.
    PERFORM pg_advisory_xact_lock(hashtext('pgqueue.depth'), hashtext(q.name))
    FROM "{s}".queues AS q
    WHERE q.name IN (SELECT DISTINCT u.queue FROM unnest(p_queue) AS u(queue))
      AND q.max_depth IS NOT NULL
    ORDER BY q.name;
    SELECT q.name INTO full_queue
    FROM (SELECT u.queue, count(*) AS n FROM unnest(p_queue) AS u(queue) GROUP BY u.queue) AS c
    JOIN "{s}".queues AS q ON q.name = c.queue AND q.max_depth IS NOT NULL
    WHERE (SELECT count(*) FROM (SELECT 1 FROM "{s}".jobs AS j
                                 WHERE j.queue = c.queue AND j.state <> 'running'
                                 LIMIT q.max_depth) AS bounded) + c.n > q.max_depth
    LIMIT 1;
    IF full_queue IS NOT NULL THEN
        RETURN QUERY SELECT u.pos, NULL::bigint, 'queue_full:' || full_queue
                     FROM unnest(p_queue) WITH ORDINALITY AS u(queue, pos);
        RETURN;
    END IF;
    -- Every queue that ever got a job is listed (and pausable) in pgqueue.queues; an
    -- existing row costs one index probe and takes no lock.
    INSERT INTO "{s}".queues (name)
    SELECT DISTINCT u.queue FROM unnest(p_queue) AS u(queue) ORDER BY 1
    ON CONFLICT (name) DO NOTHING;

    -- Ids are drawn up front (in input order), so no join is needed to report them.
    RETURN QUERY
    WITH rows AS MATERIALIZED (
        SELECT nextval(id_sequence) AS id, u.*
        FROM unnest(p_queue, p_task, p_args, p_headers, p_priority, p_run_at,
                    p_delay, p_max_attempts, p_timeout, p_ordering_key, p_unique_key)
            WITH ORDINALITY AS u(queue, task, args, headers, priority, run_at, delay,
                                 max_attempts, timeout_seconds, ordering_key, unique_key, pos)
        WHERE u.ordering_key IS NULL AND u.unique_key IS NULL
    ), inserted AS (
        INSERT INTO "{s}".jobs AS j (id, queue, task, args, headers, priority, run_at,
                                     max_attempts, timeout_seconds)
        OVERRIDING SYSTEM VALUE
        SELECT id, queue, task, args, headers, priority,
               coalesce(run_at, now() + make_interval(secs => delay)),
               max_attempts, timeout_seconds
        FROM rows
    )
    SELECT r.pos, r.id, 'inserted'::text FROM rows AS r;

    -- One NOTIFY per queue that got a ready plain job (PostgreSQL folds repeats anyway).
    PERFORM pg_notify('pgqueue_' || left(md5('{s}.' || ready.queue), 24), '')
    FROM (SELECT DISTINCT u.queue
          FROM unnest(p_queue, p_run_at, p_delay, p_ordering_key, p_unique_key)
              AS u(queue, run_at, delay, ordering_key, unique_key)
          WHERE u.ordering_key IS NULL AND u.unique_key IS NULL
            AND coalesce(u.run_at, now() + make_interval(secs => u.delay)) <= now()) AS ready;

    -- Keyed jobs (without a unique key), set-based: take each (queue, key) lock in one
    -- order, so concurrent enqueuers cannot deadlock, reserving a block of sequence
    -- numbers per key...
    -- Keys that also have a job with a unique key in this call go through the loop below
    -- as a whole, so that their jobs keep input order.
    SELECT array_agg(DISTINCT u.queue || chr(31) || u.ordering_key) INTO mixed_keys
    FROM unnest(p_queue, p_ordering_key, p_unique_key) AS u(queue, ordering_key, unique_key)
    WHERE u.ordering_key IS NOT NULL AND u.unique_key IS NOT NULL;
    mixed_keys := coalesce(mixed_keys, '{{}}');
    WITH reserved AS (
        INSERT INTO "{s}".ordering_keys AS k (scope, key, last_seq)
        SELECT 'job:' || u.queue, u.ordering_key, count(*)
        FROM unnest(p_queue, p_ordering_key, p_unique_key) AS u(queue, ordering_key, unique_key)
        WHERE u.ordering_key IS NOT NULL AND u.unique_key IS NULL
          AND NOT (u.queue || chr(31) || u.ordering_key = ANY(mixed_keys))
        GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (scope, key) DO UPDATE
            SET last_seq = k.last_seq + excluded.last_seq, updated_at = now()
        RETURNING k.scope, k.key, k.last_seq
    )
    SELECT array_agg(substr(scope, 5)), array_agg(key), array_agg(last_seq)
    INTO key_queues, key_names, key_tops FROM reserved;
    IF key_names IS NOT NULL THEN
        -- ...then, in a statement whose snapshot follows those locks, insert: only the
        -- head of an idle key is available, the rest wait their turn.
        RETURN QUERY
        WITH tops AS (
            SELECT t.queue, t.key, t.top,
                   EXISTS (SELECT 1 FROM "{s}".jobs AS j
                           WHERE j.queue = t.queue AND j.ordering_key = t.key
                             AND j.state IN ('available', 'running'))
                   OR EXISTS (SELECT 1 FROM "{s}".jobs AS j
                              WHERE j.queue = t.queue AND j.ordering_key = t.key
                                AND j.state = 'waiting')
                   OR EXISTS (SELECT 1 FROM "{s}".dead_jobs AS d
                              WHERE d.queue = t.queue AND d.ordering_key = t.key
                                AND d.blocks_key) AS is_active
            FROM unnest(key_queues, key_names, key_tops) AS t(queue, key, top)
        ), keyed AS MATERIALIZED (
            SELECT nextval(id_sequence) AS id, u.*,
                   row_number() OVER (PARTITION BY u.queue, u.ordering_key ORDER BY u.pos) AS rank,
                   count(*) OVER (PARTITION BY u.queue, u.ordering_key) AS n
            FROM unnest(p_queue, p_task, p_args, p_headers, p_priority, p_run_at,
                        p_delay, p_max_attempts, p_timeout, p_ordering_key, p_unique_key)
                WITH ORDINALITY AS u(queue, task, args, headers, priority, run_at, delay,
                                     max_attempts, timeout_seconds, ordering_key, unique_key,
                                     pos)
            WHERE u.ordering_key IS NOT NULL AND u.unique_key IS NULL
              AND NOT (u.queue || chr(31) || u.ordering_key = ANY(mixed_keys))
        ), inserted AS (
            INSERT INTO "{s}".jobs (id, queue, task, args, headers, priority, run_at,
                                    max_attempts, timeout_seconds, ordering_key, key_seq, state)
            OVERRIDING SYSTEM VALUE
            SELECT k.id, k.queue, k.task, k.args, k.headers, k.priority,
                   coalesce(k.run_at, now() + make_interval(secs => k.delay)),
                   k.max_attempts, k.timeout_seconds, k.ordering_key, t.top - k.n + k.rank,
                   CASE WHEN k.rank = 1 AND NOT t.is_active THEN 'available' ELSE 'waiting' END
            FROM keyed AS k JOIN tops AS t ON t.queue = k.queue AND t.key = k.ordering_key
        )
        SELECT k.pos, k.id, 'inserted'::text FROM keyed AS k;
        PERFORM pg_notify('pgqueue_' || left(md5('{s}.' || q), 24), '')
        FROM (SELECT DISTINCT q FROM unnest(key_queues) AS q) AS woken;
    END IF;

    -- Jobs with a unique key, one by one (each may wait on a concurrent duplicate), in key
    -- order so concurrent bulk enqueues lock keys in one order.
    FOR r IN
        SELECT * FROM unnest(p_queue, p_task, p_args, p_headers, p_priority, p_run_at,
                             p_delay, p_max_attempts, p_timeout, p_ordering_key, p_unique_key)
            WITH ORDINALITY AS u(queue, task, args, headers, priority, run_at, delay,
                                 max_attempts, timeout_seconds, ordering_key, unique_key, pos)
        WHERE u.unique_key IS NOT NULL
           OR (u.ordering_key IS NOT NULL AND u.queue || chr(31) || u.ordering_key = ANY(mixed_keys))
        ORDER BY u.queue, u.ordering_key NULLS FIRST, u.pos
    LOOP
        IF r.unique_key IS NOT NULL THEN
            -- The cheap path for a committed duplicate. An uncommitted one makes the INSERT
            -- below wait for its outcome; no unique violation ever reaches the caller.
            SELECT j.id INTO new_id FROM "{s}".jobs AS j
            WHERE j.queue = r.queue AND j.unique_key = r.unique_key;
            IF new_id IS NOT NULL THEN
                pos := r.pos; job_id := new_id; status := 'duplicate';
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        new_seq := NULL;
        is_active := false;
        IF r.ordering_key IS NOT NULL THEN
            INSERT INTO "{s}".ordering_keys AS k (scope, key, last_seq)
            VALUES ('job:' || r.queue, r.ordering_key, 1)
            ON CONFLICT (scope, key) DO UPDATE
                SET last_seq = k.last_seq + 1, updated_at = now()
            RETURNING k.last_seq INTO new_seq;
            -- Fresh snapshot after the key lock: sees heads finished by lock holders.
            SELECT EXISTS (SELECT 1 FROM "{s}".jobs AS j
                           WHERE j.queue = r.queue AND j.ordering_key = r.ordering_key
                             AND j.state IN ('available', 'running'))
                OR EXISTS (SELECT 1 FROM "{s}".jobs AS j
                           WHERE j.queue = r.queue AND j.ordering_key = r.ordering_key
                             AND j.state = 'waiting')
                OR EXISTS (SELECT 1 FROM "{s}".dead_jobs AS d
                           WHERE d.queue = r.queue AND d.ordering_key = r.ordering_key
                             AND d.blocks_key)
            INTO is_active;
        END IF;
        INSERT INTO "{s}".jobs AS j (queue, task, args, headers, priority, run_at, max_attempts,
                                     timeout_seconds, ordering_key, key_seq, unique_key, state)
        VALUES (r.queue, r.task, r.args, r.headers, r.priority,
                coalesce(r.run_at, now() + make_interval(secs => r.delay)), r.max_attempts,
                r.timeout_seconds, r.ordering_key, new_seq, r.unique_key,
                CASE WHEN is_active THEN 'waiting' ELSE 'available' END)
        ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL DO NOTHING
        RETURNING j.id INTO new_id;
        IF new_id IS NULL THEN
            -- Lost a race with a concurrent transaction that committed the same unique key.
            SELECT j.id INTO new_id FROM "{s}".jobs AS j
            WHERE j.queue = r.queue AND j.unique_key = r.unique_key;
            pos := r.pos; job_id := new_id; status := 'duplicate';
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF NOT is_active THEN
            PERFORM pg_notify('pgqueue_' || left(md5('{s}.' || r.queue), 24), '');
        END IF;
        pos := r.pos; job_id := new_id; status := 'inserted';
        RETURN NEXT;
    END LOOP;
END
$$""",
        # The bulk fast path: before a COPY of plain jobs, check depth limits, register the
        # queues, wake their workers and draw the ids, in one call. Returns 'copy' with the
        # database time and the ids, 'queue_full:<name>', or 'no_copy' when the caller may
        # not insert into the table directly (a producer role): then use enqueue_jobs.
        f"""
CREATE FUNCTION "{s}".prepare_bulk_enqueue(
    p_queue text[], p_queue_counts int[], p_ready_queues text[], p_count int
)
RETURNS TABLE (status text, db_now timestamptz, ids bigint[])
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    full_queue text;
    -- Resolved once: as an argument of nextval it would be looked up again for every id.
    id_sequence regclass := pg_get_serial_sequence('"{s}".jobs', 'id')::regclass;
BEGIN
    IF NOT has_table_privilege('"{s}".jobs', 'INSERT') THEN
        RETURN QUERY SELECT 'no_copy'::text, now(), NULL::bigint[];
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('pgqueue.depth'), hashtext(q.name))
    FROM "{s}".queues AS q
    WHERE q.name = ANY(p_queue) AND q.max_depth IS NOT NULL
    ORDER BY q.name;
    SELECT q.name INTO full_queue
    FROM unnest(p_queue, p_queue_counts) AS c(queue, n)
    JOIN "{s}".queues AS q ON q.name = c.queue AND q.max_depth IS NOT NULL
    WHERE (SELECT count(*) FROM (SELECT 1 FROM "{s}".jobs AS j
                                 WHERE j.queue = c.queue AND j.state <> 'running'
                                 LIMIT q.max_depth) AS bounded) + c.n > q.max_depth
    LIMIT 1;
    IF full_queue IS NOT NULL THEN
        RETURN QUERY SELECT 'queue_full:' || full_queue, now(), NULL::bigint[];
        RETURN;
    END IF;
    INSERT INTO "{s}".queues (name)
    SELECT DISTINCT u.queue FROM unnest(p_queue) AS u(queue) ORDER BY 1
    ON CONFLICT (name) DO NOTHING;
    PERFORM pg_notify('pgqueue_' || left(md5('{s}.' || r.queue), 24), '')
    FROM (SELECT DISTINCT u.queue FROM unnest(p_ready_queues) AS u(queue)) AS r;
    RETURN QUERY
    SELECT 'copy'::text, now(),
           ARRAY(SELECT nextval(id_sequence) FROM generate_series(1, p_count));
END
$$""",
        # One plain job (no ordering or unique key): the common producer call, in three
        # statements instead of enqueue_jobs' dozen. A depth-limited queue takes the general
        # path, which holds the depth lock.
        f"""
CREATE FUNCTION "{s}".enqueue_job(
    p_queue text, p_task text, p_args jsonb, p_headers jsonb, p_priority smallint,
    p_run_at timestamptz, p_delay float8, p_max_attempts int, p_timeout float8
) RETURNS TABLE (job_id bigint, status text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
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
    IF run <= now() THEN
        PERFORM pg_notify('pgqueue_' || left(md5('{s}.' || p_queue), 24), '');
    END IF;
    -- The row is returned by assignment: a RETURN QUERY would start one more executor.
    status := 'inserted';
    RETURN NEXT;
END
$$""",
        # Claim up to p_limit ready jobs of one queue, honouring pause, the global
        # concurrency limit and the rate limit. Limited queues serialize their claims on
        # the queue row; unlimited queues never touch it beyond one primary-key read.
        f"""
CREATE FUNCTION "{s}".claim_jobs(
    p_queue text, p_limit int, p_worker uuid, p_lease_seconds float8,
    p_task_names text[], p_task_max_attempts int[], p_default_max_attempts int
) RETURNS SETOF "{s}".jobs
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    q "{s}".queues%ROWTYPE;
    allowed int := p_limit;
    running_now int;
    tokens float8;
    claimed int;
    -- One fresh token per claim, shared by the jobs it leases: (id, token) still names
    -- this lease alone, and gen_random_uuid() per row cost a third of the claim.
    lease uuid := gen_random_uuid();
BEGIN
    SELECT * INTO q FROM "{s}".queues WHERE name = p_queue;
    IF FOUND AND q.is_paused THEN
        RETURN;
    END IF;
    IF FOUND AND (q.concurrency_limit IS NOT NULL OR q.rate_limit IS NOT NULL) THEN
        SELECT * INTO q FROM "{s}".queues WHERE name = p_queue FOR UPDATE;
        IF q.is_paused THEN
            RETURN;
        END IF;
        IF q.concurrency_limit IS NOT NULL THEN
            SELECT count(*) INTO running_now FROM "{s}".jobs
            WHERE queue = p_queue AND state = 'running';
            allowed := least(allowed, q.concurrency_limit - running_now);
        END IF;
        IF q.rate_limit IS NOT NULL THEN
            -- Token bucket of rate_limit tokens refilled over rate_interval_seconds.
            tokens := least(
                q.rate_limit::float8,
                coalesce(q.rate_tokens, q.rate_limit::float8)
                + extract(epoch FROM now() - coalesce(q.rate_updated_at, now()))
                  * q.rate_limit / q.rate_interval_seconds);
            allowed := least(allowed, floor(tokens)::int);
        END IF;
        IF allowed <= 0 THEN
            RETURN;
        END IF;
    END IF;

    RETURN QUERY
    WITH candidates AS (
        SELECT j.id FROM "{s}".jobs AS j
        WHERE j.state = 'available' AND j.queue = p_queue AND j.run_at <= now()
        ORDER BY j.priority DESC, j.run_at, j.id
        LIMIT allowed
        FOR UPDATE SKIP LOCKED
    )
    UPDATE "{s}".jobs AS j
    SET state = 'running',
        attempts = j.attempts + 1,
        -- An array lookup, not a subquery over unnest(): that ran once per claimed row.
        max_attempts = coalesce(
            j.max_attempts,
            p_task_max_attempts[array_position(p_task_names, j.task)],
            p_default_max_attempts),
        lease_token = lease,
        lease_expires_at = now() + make_interval(secs => p_lease_seconds),
        worker_id = p_worker,
        claimed_at = now(),
        heartbeat_at = now()
    -- "= ANY(ARRAY(...))" keeps the update on primary-key lookups: as a join to
    -- candidates, once the table has statistics, it was planned as a hash join over a
    -- sequential scan of the whole table (27 ms instead of 17 ms per 1,000 jobs at 60,000).
    WHERE j.id = ANY(ARRAY(SELECT c.id FROM candidates AS c))
    RETURNING j.*;

    IF q.rate_limit IS NOT NULL THEN
        GET DIAGNOSTICS claimed = ROW_COUNT;
        UPDATE "{s}".queues SET rate_tokens = tokens - claimed, rate_updated_at = now()
        WHERE name = p_queue;
    END IF;
END
$$""",
        # Acknowledge held jobs (fenced by lease token), count them, advance their keys.
        f"""
CREATE FUNCTION "{s}".complete_jobs(p_ids bigint[], p_tokens uuid[])
RETURNS SETOF bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    done_ids bigint[];
    key_queues text[];
    key_names text[];
    k record;
BEGIN
    -- Found by primary key (id = ANY): a "state = 'running'" condition here let the planner,
    -- with statistics taken while few jobs ran, scan the whole running-jobs index, which
    -- grows with every deleted job until vacuum, so acks slowed as a long drain went on.
    -- The token alone proves the lease: a check constraint ties tokens to running jobs.
    WITH done AS (
        DELETE FROM "{s}".jobs AS j
        USING unnest(p_ids, p_tokens) AS a(id, token)
        WHERE j.id = ANY(p_ids) AND j.id = a.id AND j.lease_token = a.token
        RETURNING j.id, j.queue, j.ordering_key
    ), counted AS (
        INSERT INTO "{s}".queue_throughput AS t (queue, minute, completed)
        SELECT queue, date_trunc('minute', now()), count(*) FROM done GROUP BY queue
        ORDER BY queue
        ON CONFLICT (queue, minute) DO UPDATE SET completed = t.completed + excluded.completed
    )
    SELECT array_agg(id),
           array_agg(queue) FILTER (WHERE ordering_key IS NOT NULL),
           array_agg(ordering_key) FILTER (WHERE ordering_key IS NOT NULL)
    INTO done_ids, key_queues, key_names
    FROM done;
    IF key_names IS NOT NULL THEN
        PERFORM "{s}".job_keys_advance(key_queues, key_names);
    END IF;
    RETURN QUERY SELECT unnest(done_ids);
END
$$""",
        # Dead-letter held jobs with their error. A keyed job blocks its key (the later
        # jobs wait for an operator) unless its task lets the key continue.
        f"""
CREATE FUNCTION "{s}".fail_jobs(
    p_ids bigint[], p_tokens uuid[], p_reasons text[], p_errors text[], p_block_keys boolean[]
) RETURNS SETOF bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    dead_ids bigint[];
    key_queues text[];
    key_names text[];
    k record;
BEGIN
    WITH dead AS (
        DELETE FROM "{s}".jobs AS j
        USING unnest(p_ids, p_tokens, p_reasons, p_errors, p_block_keys)
            AS a(id, token, reason, error, block_key)
        WHERE j.id = ANY(p_ids) AND j.id = a.id AND j.lease_token = a.token
        RETURNING j.*, a.reason AS dead_reason, a.error AS dead_error,
                  (j.ordering_key IS NOT NULL AND a.block_key) AS dead_blocks
    ), moved AS (
        INSERT INTO "{s}".dead_jobs
            (id, queue, task, args, headers, priority, attempts, max_attempts,
             timeout_seconds, ordering_key, key_seq, unique_key, reason, last_error,
             worker_id, created_at, blocks_key)
        SELECT id, queue, task, args, headers, priority, attempts, max_attempts,
               timeout_seconds, ordering_key, key_seq, unique_key, dead_reason,
               coalesce(dead_error, last_error), worker_id, created_at, dead_blocks
        FROM dead
    ), counted AS (
        INSERT INTO "{s}".queue_throughput AS t (queue, minute, failed)
        SELECT queue, date_trunc('minute', now()), count(*) FROM dead GROUP BY queue
        ORDER BY queue
        ON CONFLICT (queue, minute) DO UPDATE SET failed = t.failed + excluded.failed
    )
    SELECT array_agg(id),
           array_agg(queue) FILTER (WHERE ordering_key IS NOT NULL AND NOT dead_blocks),
           array_agg(ordering_key) FILTER (WHERE ordering_key IS NOT NULL AND NOT dead_blocks)
    INTO dead_ids, key_queues, key_names
    FROM dead;
    IF key_names IS NOT NULL THEN
        PERFORM "{s}".job_keys_advance(key_queues, key_names);
    END IF;
    RETURN QUERY SELECT unnest(dead_ids);
END
$$""",
        # Return jobs whose lease ran out to the queue, or dead-letter them when out of
        # attempts (blocking their key: the task's policy is unknown here, so be safe).
        # SKIP LOCKED plus the re-checked predicate leave a job alone that was acked or
        # heartbeated meanwhile, and let racing rescuers split the work.
        f"""
CREATE FUNCTION "{s}".rescue_expired_jobs(p_limit int, p_default_max_attempts int)
RETURNS TABLE (requeued bigint, dead bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH expired AS (
        SELECT j.id FROM "{s}".jobs AS j
        WHERE j.state = 'running' AND j.lease_expires_at < now()
        ORDER BY j.lease_expires_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), back AS (
        UPDATE "{s}".jobs AS j
        SET state = 'available', run_at = now(),
            last_error = 'lease expired on worker ' || coalesce(j.worker_id::text, '?')
                         || ' during attempt ' || j.attempts,
            lease_token = NULL, lease_expires_at = NULL, worker_id = NULL, heartbeat_at = NULL
        FROM expired AS e
        WHERE j.id = e.id AND j.attempts < coalesce(j.max_attempts, p_default_max_attempts)
        RETURNING j.id
    ), dead AS (
        DELETE FROM "{s}".jobs AS j
        USING expired AS e
        WHERE j.id = e.id AND j.attempts >= coalesce(j.max_attempts, p_default_max_attempts)
        RETURNING j.*
    ), moved AS (
        INSERT INTO "{s}".dead_jobs
            (id, queue, task, args, headers, priority, attempts, max_attempts,
             timeout_seconds, ordering_key, key_seq, unique_key, reason, last_error,
             worker_id, created_at, blocks_key)
        SELECT id, queue, task, args, headers, priority, attempts, max_attempts,
               timeout_seconds, ordering_key, key_seq, unique_key, 'lease_expired',
               'lease expired on worker ' || coalesce(worker_id::text, '?')
                   || ' during attempt ' || attempts || ' of '
                   || coalesce(max_attempts, p_default_max_attempts)
                   || coalesce(E'\nprevious error: ' || last_error, ''),
               worker_id, created_at, ordering_key IS NOT NULL
        FROM dead
    ), counted AS (
        INSERT INTO "{s}".queue_throughput AS t (queue, minute, failed)
        SELECT queue, date_trunc('minute', now()), count(*) FROM dead GROUP BY queue
        ORDER BY queue
        ON CONFLICT (queue, minute) DO UPDATE SET failed = t.failed + excluded.failed
    )
    SELECT (SELECT count(*) FROM back), (SELECT count(*) FROM dead);
END
$$""",
        # Self-healing: advance keys whose waiting jobs have no active head and no blocking
        # dead letter (what a lost race under REPEATABLE READ could leave behind).
        f"""
CREATE FUNCTION "{s}".advance_stalled_keys(p_limit int) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    k record;
    advanced bigint := 0;
BEGIN
    FOR k IN
        SELECT DISTINCT w.queue, w.ordering_key FROM "{s}".jobs AS w
        WHERE w.state = 'waiting'
          AND NOT EXISTS (SELECT 1 FROM "{s}".jobs AS a
                          WHERE a.queue = w.queue AND a.ordering_key = w.ordering_key
                            AND a.state IN ('available', 'running'))
          AND NOT EXISTS (SELECT 1 FROM "{s}".dead_jobs AS d
                          WHERE d.queue = w.queue AND d.ordering_key = w.ordering_key
                            AND d.blocks_key)
        ORDER BY 1, 2
        LIMIT p_limit
    LOOP
        advanced := advanced + "{s}".job_keys_advance(ARRAY[k.queue], ARRAY[k.ordering_key]);
    END LOOP;
    RETURN advanced;
END
$$""",
    ]


def downgrade() -> None:
    s = _schema()
    for function in (
        "prepare_bulk_enqueue(text[], int[], text[], int)",
        "advance_stalled_keys(int)",
        "rescue_expired_jobs(int, int)",
        "fail_jobs(bigint[], uuid[], text[], text[], boolean[])",
        "complete_jobs(bigint[], uuid[])",
        "claim_jobs(text, int, uuid, float8, text[], int[], int)",
        "enqueue_job(text, text, jsonb, jsonb, smallint, timestamptz, float8, int, float8)",
        "enqueue_jobs(text[], text[], jsonb[], jsonb[], smallint[], timestamptz[], float8[], "
        "int[], float8[], text[], text[])",
        "job_key_advance(text, text)",
        "job_keys_advance(text[], text[])",
    ):
        op.execute(sa.text(f'DROP FUNCTION IF EXISTS "{s}".{function}'))
    op.drop_table("cron_ticks", schema=s)
    op.drop_table("ordering_keys", schema=s)
    op.drop_constraint("queues_rate_check", "queues", schema=s)
    op.drop_column("queues", "rate_updated_at", schema=s)
    op.drop_column("queues", "rate_tokens", schema=s)
    op.drop_index("dead_jobs_key_idx", "dead_jobs", schema=s)
    op.drop_column("dead_jobs", "blocks_key", schema=s)
    op.drop_index("jobs_key_waiting_idx", "jobs", schema=s)
    op.drop_index("jobs_key_active_idx", "jobs", schema=s)
    op.create_index(
        "jobs_ordering_key_idx",
        "jobs",
        ["queue", "ordering_key", "key_seq"],
        schema=s,
        postgresql_where=sa.text("ordering_key IS NOT NULL"),
    )
    op.drop_constraint("jobs_args_size_check", "jobs", schema=s)
    op.drop_constraint("jobs_state_check", "jobs", schema=s)
    op.create_check_constraint(
        "jobs_state_check", "jobs", "state IN ('available', 'running')", schema=s
    )
