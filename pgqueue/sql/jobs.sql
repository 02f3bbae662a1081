-- Named queries on the jobs tables. {schema} is filled with a quoted identifier after the
-- allow-list; every value is a bound parameter.

-- name: insert_job
-- One job in the caller's transaction; NOTIFY (deduplicated by PostgreSQL per transaction
-- and channel) only when the job is ready now, so scheduled jobs wake nobody.
WITH inserted AS (
    INSERT INTO {schema}.jobs
        (queue, task, args, headers, priority, run_at, max_attempts, timeout_seconds,
         ordering_key, unique_key)
    VALUES (%(queue)s, %(task)s, %(args)s::jsonb, %(headers)s::jsonb, %(priority)s,
            coalesce(%(run_at)s::timestamptz, now() + make_interval(secs => %(delay)s)),
            %(max_attempts)s, %(timeout_seconds)s, %(ordering_key)s, %(unique_key)s)
    RETURNING id, run_at <= now() AS is_ready
)
SELECT i.id, n.signal
FROM inserted AS i
LEFT JOIN LATERAL (SELECT pg_notify(%(channel)s, '')::text AS signal WHERE i.is_ready) AS n ON true

-- name: insert_jobs
-- Many jobs in one statement from parallel arrays (one round trip for 100,000 rows), and
-- one NOTIFY per distinct ready queue.
WITH rows AS (
    SELECT * FROM unnest(
        %(queue)s::text[], %(task)s::text[], %(args)s::jsonb[], %(headers)s::jsonb[],
        %(priority)s::smallint[], %(run_at)s::timestamptz[], %(delay)s::float8[],
        %(max_attempts)s::int[], %(timeout_seconds)s::float8[]
    ) WITH ORDINALITY AS r(queue, task, args, headers, priority, run_at, delay,
                           max_attempts, timeout_seconds, position)
), inserted AS (
    INSERT INTO {schema}.jobs
        (queue, task, args, headers, priority, run_at, max_attempts, timeout_seconds)
    SELECT queue, task, args, headers, priority,
           coalesce(run_at, now() + make_interval(secs => delay)), max_attempts, timeout_seconds
    FROM rows
    ORDER BY position
    RETURNING id, queue, run_at <= now() AS is_ready
), woken AS MATERIALIZED (
    SELECT pg_notify('pgqueue_' || left(md5(%(schema)s || '.' || queue), 24), '')::text AS signal
    FROM (SELECT DISTINCT queue FROM inserted WHERE is_ready) AS ready
)
SELECT (SELECT count(signal) FROM woken) AS notified, array_agg(id ORDER BY id) AS ids
FROM inserted

-- name: claim_jobs
-- Lease up to %(limit)s ready jobs of one queue in one round trip. The attempt is counted
-- here, so a job that kills its worker still runs out of attempts. max_attempts left NULL
-- at enqueue is filled from the worker's task registry so rescue can judge it later.
WITH candidates AS (
    SELECT j.id
    FROM {schema}.jobs AS j
    WHERE j.state = 'available'
      AND j.queue = %(queue)s
      AND j.run_at <= now()
      AND NOT EXISTS (SELECT 1 FROM {schema}.queues AS q WHERE q.name = %(queue)s AND q.is_paused)
    ORDER BY j.priority DESC, j.run_at, j.id
    LIMIT %(limit)s
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE {schema}.jobs AS j
SET state = 'running',
    attempts = j.attempts + 1,
    max_attempts = coalesce(
        j.max_attempts,
        (SELECT d.max_attempts
         FROM unnest(%(task_names)s::text[], %(task_max_attempts)s::int[]) AS d(task, max_attempts)
         WHERE d.task = j.task),
        %(default_max_attempts)s),
    lease_token = gen_random_uuid(),
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
    worker_id = %(worker_id)s,
    claimed_at = now(),
    heartbeat_at = now()
FROM candidates AS c
WHERE j.id = c.id
RETURNING j.id, j.queue, j.task, j.args, j.headers, j.priority, j.attempts, j.max_attempts,
          j.timeout_seconds, j.lease_token, j.ordering_key, j.created_at, j.run_at

-- name: complete_jobs
-- Delete the jobs this worker still holds (fenced by lease token) and count them.
WITH done AS (
    DELETE FROM {schema}.jobs AS j
    USING unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS a(id, token)
    WHERE j.id = a.id AND j.lease_token = a.token AND j.state = 'running'
    RETURNING j.id, j.queue
), counted AS (
    INSERT INTO {schema}.queue_throughput AS t (queue, minute, completed)
    SELECT queue, date_trunc('minute', now()), count(*) FROM done GROUP BY queue
    ORDER BY queue
    ON CONFLICT (queue, minute) DO UPDATE SET completed = t.completed + excluded.completed
)
SELECT id FROM done

-- name: retry_jobs
-- Put held jobs back with a delay on the database clock; a snooze gives the attempt back.
WITH retried AS (
    UPDATE {schema}.jobs AS j
    SET state = 'available',
        run_at = now() + make_interval(secs => a.delay),
        attempts = j.attempts - CASE WHEN a.is_snooze THEN 1 ELSE 0 END,
        last_error = coalesce(a.error, j.last_error),
        lease_token = NULL, lease_expires_at = NULL, worker_id = NULL, heartbeat_at = NULL
    FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(delays)s::float8[],
                %(errors)s::text[], %(snoozes)s::bool[]) AS a(id, token, delay, error, is_snooze)
    WHERE j.id = a.id AND j.lease_token = a.token AND j.state = 'running'
    RETURNING j.id, j.queue, a.is_snooze
), counted AS (
    INSERT INTO {schema}.queue_throughput AS t (queue, minute, retried)
    SELECT queue, date_trunc('minute', now()), count(*) FROM retried
    WHERE NOT is_snooze GROUP BY queue
    ORDER BY queue
    ON CONFLICT (queue, minute) DO UPDATE SET retried = t.retried + excluded.retried
)
SELECT id FROM retried

-- name: fail_jobs
-- Move held jobs to the dead letters with their error, in one statement.
WITH dead AS (
    DELETE FROM {schema}.jobs AS j
    USING unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(reasons)s::text[], %(errors)s::text[])
        AS a(id, token, reason, error)
    WHERE j.id = a.id AND j.lease_token = a.token AND j.state = 'running'
    RETURNING j.*, a.reason AS dead_reason, a.error AS dead_error
), moved AS (
    INSERT INTO {schema}.dead_jobs
        (id, queue, task, args, headers, priority, attempts, max_attempts, timeout_seconds,
         ordering_key, key_seq, unique_key, reason, last_error, worker_id, created_at)
    SELECT id, queue, task, args, headers, priority, attempts, max_attempts, timeout_seconds,
           ordering_key, key_seq, unique_key, dead_reason, coalesce(dead_error, last_error),
           worker_id, created_at
    FROM dead
), counted AS (
    INSERT INTO {schema}.queue_throughput AS t (queue, minute, failed)
    SELECT queue, date_trunc('minute', now()), count(*) FROM dead GROUP BY queue
    ORDER BY queue
    ON CONFLICT (queue, minute) DO UPDATE SET failed = t.failed + excluded.failed
)
SELECT id FROM dead

-- name: release_jobs
-- Give held jobs back at once (shutdown, prefetched but never started); the attempt
-- counted at claim is returned because the job never got its chance.
UPDATE {schema}.jobs AS j
SET state = 'available', attempts = greatest(j.attempts - 1, 0),
    lease_token = NULL, lease_expires_at = NULL, worker_id = NULL, heartbeat_at = NULL
FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS a(id, token)
WHERE j.id = a.id AND j.lease_token = a.token AND j.state = 'running'
RETURNING j.id

-- name: heartbeat_jobs
-- Extend the leases this worker still holds; a missing id in the result is a lost lease.
UPDATE {schema}.jobs AS j
SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s), heartbeat_at = now()
FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS a(id, token)
WHERE j.id = a.id AND j.lease_token = a.token AND j.state = 'running'
RETURNING j.id

-- name: complete_job_in_transaction
-- The ack of one job inside the handler's own transaction (effectively-once DB effects).
WITH done AS (
    DELETE FROM {schema}.jobs
    WHERE id = %(id)s AND lease_token = %(token)s AND state = 'running'
    RETURNING id, queue
), counted AS (
    INSERT INTO {schema}.queue_throughput AS t (queue, minute, completed)
    SELECT queue, date_trunc('minute', now()), 1 FROM done
    ON CONFLICT (queue, minute) DO UPDATE SET completed = t.completed + 1
)
SELECT id FROM done

-- name: rescue_expired
-- Jobs whose lease ran out (their worker died or hung) go back to the queue, or to the
-- dead letters when out of attempts. SKIP LOCKED plus the re-checked predicate means a
-- job acked or heartbeated meanwhile is left alone, and racing rescuers split the work.
WITH expired AS (
    SELECT id FROM {schema}.jobs
    WHERE state = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), requeued AS (
    UPDATE {schema}.jobs AS j
    SET state = 'available', run_at = now(),
        last_error = 'lease expired on worker ' || coalesce(j.worker_id::text, '?')
                     || ' during attempt ' || j.attempts,
        lease_token = NULL, lease_expires_at = NULL, worker_id = NULL, heartbeat_at = NULL
    FROM expired AS e
    WHERE j.id = e.id AND j.attempts < coalesce(j.max_attempts, %(default_max_attempts)s)
    RETURNING j.id
), dead AS (
    DELETE FROM {schema}.jobs AS j
    USING expired AS e
    WHERE j.id = e.id AND j.attempts >= coalesce(j.max_attempts, %(default_max_attempts)s)
    RETURNING j.*
), moved AS (
    INSERT INTO {schema}.dead_jobs
        (id, queue, task, args, headers, priority, attempts, max_attempts, timeout_seconds,
         ordering_key, key_seq, unique_key, reason, last_error, worker_id, created_at)
    SELECT id, queue, task, args, headers, priority, attempts, max_attempts, timeout_seconds,
           ordering_key, key_seq, unique_key, 'lease_expired',
           'lease expired on worker ' || coalesce(worker_id::text, '?') || ' during attempt '
               || attempts || ' of ' || coalesce(max_attempts, %(default_max_attempts)s)
               || coalesce(E'\nprevious error: ' || last_error, ''),
           worker_id, created_at
    FROM dead
)
SELECT (SELECT count(*) FROM requeued) AS requeued, (SELECT count(*) FROM dead) AS dead
