-- Named queries on the processes table (live workers and relays) and queue bookkeeping.

-- name: heartbeat_process
-- Proof of life for the workers view; re-inserts the row if maintenance pruned it.
INSERT INTO {schema}.processes (id, kind, host, pid, queues, concurrency)
VALUES (%(id)s, %(kind)s, %(host)s, %(pid)s, %(queues)s::text[], %(concurrency)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()

-- name: mark_worker_busy
-- A worker says whether a one-job enqueue may skip its NOTIFY (%(busy)s) or must send it;
-- the row is written whole, so the mark holds even before the first heartbeat.
INSERT INTO {schema}.processes AS p (id, kind, host, pid, queues, concurrency, busy_since)
VALUES (%(id)s, %(kind)s, %(host)s, %(pid)s, %(queues)s::text[], %(concurrency)s,
        CASE WHEN %(busy)s THEN now() END)
ON CONFLICT (id) DO UPDATE SET busy_since = EXCLUDED.busy_since

-- name: transactions_in_progress
-- The transactions in progress now (ids as text): after a worker cleared its busy mark, the
-- producers that may have skipped their NOTIFY because of it are among them.
SELECT ARRAY(SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) AS x) AS xids

-- name: transactions_still_in_progress
-- Which of the given transactions have not ended yet.
SELECT ARRAY(SELECT x::text FROM unnest(%(xids)s::xid8[]) AS x
             WHERE pg_xact_status(x) = 'in progress') AS xids

-- name: unregister_process
-- A clean exit removes the row at once instead of waiting for pruning.
DELETE FROM {schema}.processes WHERE id = %(id)s

-- name: prune_processes
-- Forget processes silent for longer than the given number of seconds.
DELETE FROM {schema}.processes
WHERE heartbeat_at < now() - make_interval(secs => %(stale_seconds)s)

-- name: register_queues
-- Make the served queues visible (and pausable) even before their first job.
INSERT INTO {schema}.queues (name)
SELECT unnest(%(queues)s::text[]) ORDER BY 1
ON CONFLICT (name) DO NOTHING

-- name: prune_throughput
-- Keep a day of per-minute counters.
DELETE FROM {schema}.queue_throughput WHERE minute < now() - interval '1 day'

-- name: database_now
-- The database clock, for callers that must not trust their own.
SELECT now() AS now

-- name: record_cron_tick
-- Claim one tick of a periodic job; the primary key makes it once across all workers.
INSERT INTO {schema}.cron_ticks (name, tick_at) VALUES (%(name)s, %(tick_at)s)
ON CONFLICT (name, tick_at) DO NOTHING
RETURNING name

-- name: set_cron_tick_job
-- Remember which job a tick enqueued.
UPDATE {schema}.cron_ticks SET job_id = %(job_id)s WHERE name = %(name)s AND tick_at = %(tick_at)s

-- name: last_cron_ticks
-- The newest recorded tick of each periodic job, to resume after restarts.
SELECT name, max(tick_at) AS tick_at FROM {schema}.cron_ticks
WHERE name = ANY(%(names)s::text[]) GROUP BY name

-- name: prune_cron_ticks
-- Keep a week of tick history.
DELETE FROM {schema}.cron_ticks WHERE tick_at < now() - interval '7 days'
