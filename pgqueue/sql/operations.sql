-- Named queries for operators: inspect, retry, cancel, requeue, purge, prune, audit.

-- name: audit
-- Append one operator action to the audit trail (role and time from the database).
INSERT INTO {schema}.audit_log (action, target, count, details)
VALUES (%(action)s, %(target)s, %(count)s, %(details)s::jsonb)

-- name: list_jobs
-- Live jobs, newest first, with optional filters.
SELECT id, queue, task, state, priority, attempts, max_attempts, run_at, ordering_key,
       unique_key, worker_id, lease_expires_at,
       split_part(coalesce(last_error, ''), E'\n', 1) AS error, created_at
FROM {schema}.jobs
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(task)s::text IS NULL OR task = %(task)s)
  AND (%(state)s::text IS NULL OR state = %(state)s)
ORDER BY id DESC
LIMIT %(limit)s

-- name: show_job
-- One job wherever it is: live, or dead-lettered.
SELECT 'live' AS location, id, queue, task, state, args, headers, priority, attempts,
       max_attempts, run_at, ordering_key, key_seq, unique_key, worker_id, lease_expires_at,
       last_error, NULL::text AS reason, created_at, NULL::timestamptz AS failed_at
FROM {schema}.jobs WHERE id = %(id)s
UNION ALL
SELECT 'dead', id, queue, task, 'dead', args, headers, priority, attempts, max_attempts,
       NULL, ordering_key, key_seq, unique_key, worker_id, NULL, last_error, reason,
       created_at, failed_at
FROM {schema}.dead_jobs WHERE id = %(id)s

-- name: job_history
-- A job's recorded state changes (when job events are switched on).
SELECT at, event, attempt, worker_id FROM {schema}.job_events
WHERE job_id = %(id)s ORDER BY id

-- name: retry_job_now
-- Make a waiting-for-retry or scheduled job ready now.
UPDATE {schema}.jobs SET run_at = now()
WHERE id = %(id)s AND state = 'available' AND run_at > now()
RETURNING id

-- name: cancel_jobs
-- Move live jobs to the dead letters (reason 'cancelled'); a running one loses its lease,
-- so its worker's result is discarded. The key of a cancelled head moves on.
SELECT id FROM {schema}.cancel_jobs(%(ids)s::bigint[], %(reason)s) AS id

-- name: select_dead_jobs
-- Dead letters matching the operator's filters (used for counts, listing and actions).
SELECT id AS job_id, queue, task, attempts, max_attempts, reason,
       split_part(coalesce(last_error, ''), E'\n', 1) AS error, failed_at, ordering_key,
       blocks_key
FROM {schema}.dead_jobs
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(task)s::text IS NULL OR task = %(task)s)
  AND (%(error)s::text IS NULL OR strpos(lower(last_error), lower(%(error)s)) > 0)
  AND (%(older_than)s::float8 IS NULL
       OR failed_at < now() - make_interval(secs => %(older_than)s::float8))
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
ORDER BY failed_at DESC, id DESC
LIMIT %(limit)s

-- name: requeue_dead_jobs
-- Send dead letters back to their queue with fresh attempts.
SELECT id FROM {schema}.requeue_dead_jobs(%(ids)s::bigint[]) AS id

-- name: purge_dead_jobs
-- Delete dead letters for good; keys they were blocking move on.
SELECT id FROM {schema}.purge_dead_jobs(%(ids)s::bigint[]) AS id

-- name: prune_dead_jobs
-- Dead letters older than the retention, in a bounded batch.
SELECT id FROM {schema}.purge_dead_jobs(ARRAY(
    SELECT id FROM {schema}.dead_jobs
    WHERE failed_at < now() - make_interval(secs => %(older_than)s)
    ORDER BY failed_at LIMIT %(limit)s)) AS id

-- name: prune_outbox_dead
-- Dead outbox messages older than the retention, in a bounded batch (non-blocking ones).
WITH old AS (
    SELECT id FROM {schema}.outbox_dead
    WHERE failed_at < now() - make_interval(secs => %(older_than)s) AND NOT blocks_key
    ORDER BY failed_at LIMIT %(limit)s
)
DELETE FROM {schema}.outbox_dead AS d USING old WHERE d.id = old.id RETURNING d.id

-- name: prune_delivered_history
-- Delivered outbox messages older than the retention, in a bounded batch.
WITH old AS (
    SELECT id FROM {schema}.outbox_delivered
    WHERE delivered_at < now() - make_interval(secs => %(older_than)s)
    ORDER BY delivered_at LIMIT %(limit)s
)
DELETE FROM {schema}.outbox_delivered AS d USING old WHERE d.id = old.id RETURNING d.id

-- name: prune_job_events
-- Job event history older than the retention, in a bounded batch.
WITH old AS (
    SELECT id FROM {schema}.job_events
    WHERE at < now() - make_interval(secs => %(older_than)s)
    ORDER BY id LIMIT %(limit)s
)
DELETE FROM {schema}.job_events AS e USING old WHERE e.id = old.id RETURNING e.id

-- name: list_workers
-- Registered workers and relays.
SELECT worker_id, kind, host, pid, queues, concurrency, started_at, heartbeat_at,
       extract(epoch FROM since_heartbeat)::float8 AS seconds_since_heartbeat, is_alive
FROM {schema}.workers ORDER BY kind, host, pid

-- name: health
-- The one-row health view.
SELECT * FROM {schema}.health

-- name: audit_trail
-- The newest operator actions.
SELECT id, at, role, action, target, count, details FROM {schema}.audit_log
ORDER BY id DESC LIMIT %(limit)s
