-- Named queries on the jobs tables. {schema} is filled with a quoted identifier after the
-- allow-list; every value is a bound parameter.


-- name: enqueue_jobs
-- Any number of jobs in one round trip: plain ones in one INSERT, keyed and unique ones
-- with their locks (see the function); one NOTIFY per queue with ready jobs.
SELECT pos, job_id, status
FROM {schema}.enqueue_jobs(
    %(queue)s::text[], %(task)s::text[], %(args)s::jsonb[], %(headers)s::jsonb[],
    %(priority)s::smallint[], %(run_at)s::timestamptz[], %(delay)s::float8[],
    %(max_attempts)s::int[], %(timeout_seconds)s::float8[], %(ordering_key)s::text[],
    %(unique_key)s::text[])
ORDER BY pos

-- name: enqueue_job
-- One plain job (no ordering or unique key): the short path of enqueue().
SELECT job_id, status
FROM {schema}.enqueue_job(%(queue)s::text, %(task)s::text, %(args)s::jsonb, %(headers)s::jsonb,
                          %(priority)s::smallint, %(run_at)s::timestamptz, %(delay)s::float8,
                          %(max_attempts)s::int, %(timeout_seconds)s::float8)

-- name: prepare_bulk_enqueue
-- Before a COPY of plain jobs: depth check, queue registration, NOTIFY and ids, one call.
SELECT status, db_now, ids
FROM {schema}.prepare_bulk_enqueue(%(queues)s::text[], %(queue_counts)s::int[],
                                    %(ready_queues)s::text[], %(count)s)

-- name: copy_plain_jobs
-- The bulk insert when every job keeps the defaults: headers, priority, run_at (now(), the
-- transaction's time, as prepare_bulk_enqueue reported it) come from the column defaults.
COPY {schema}.jobs (id, queue, task, args) FROM STDIN

-- name: copy_jobs
-- The bulk insert itself (text format; ids drawn by prepare_bulk_enqueue).
COPY {schema}.jobs (id, queue, task, args, headers, priority, run_at, max_attempts,
                    timeout_seconds) FROM STDIN

-- name: claim_jobs
-- Lease up to %(limit)s ready jobs of one queue in one round trip (pause, global
-- concurrency and rate limits are enforced inside). The attempt is counted at claim.
-- Rows come as the worker reads them: empty headers as NULL, args as text (the worker
-- decodes a whole batch in one parser call), timestamps as epoch seconds (float8, turned
-- into datetimes only when a handler reads them). The hint (NULL for a scan from the start)
-- is where the caller's last full batch ended. The claim's commit does not wait for its
-- WAL to reach disk (synchronous_commit off, for this transaction alone) unless
-- %(durable)s, a claimed job has an ordering key, or the queue has a concurrency or rate
-- limit: what a crash can take back is then only plain jobs that run again (README, "The
-- contract"; migration 0007).
SELECT * FROM {schema}.claim_jobs(%(queue)s, %(limit)s, %(worker_id)s, %(lease_seconds)s,
                                  %(task_names)b::text[], %(task_max_attempts)b::int[],
                                  %(default_max_attempts)s, %(hint_priority)s::int,
                                  %(hint_epoch)s::float8, %(hint_id)s::bigint,
                                  %(durable)s::boolean)

-- name: complete_jobs
-- Delete the jobs this worker still holds (fenced by lease token), count them, and hand
-- their ordering keys to the next job.
SELECT id FROM {schema}.complete_jobs(%(ids)b::bigint[], %(tokens)b::uuid[]) AS id

-- name: retry_jobs
-- Put held jobs back with a delay on the database clock; a snooze gives the attempt back.
-- Held jobs are found by primary key and proven by their token (see complete_jobs).
WITH retried AS (
    UPDATE {schema}.jobs AS j
    SET state = 'available',
        run_at = now() + make_interval(secs => a.delay),
        attempts = j.attempts - CASE WHEN a.is_snooze THEN 1 ELSE 0 END,
        last_error = coalesce(a.error, j.last_error),
        lease_token = NULL, lease_expires_at = NULL, worker_id = NULL, heartbeat_at = NULL
    FROM unnest(%(ids)b::bigint[], %(tokens)b::uuid[], %(delays)b::float8[],
                %(errors)b::text[], %(snoozes)b::bool[]) AS a(id, token, delay, error, is_snooze)
    WHERE j.id = ANY(%(ids)b::bigint[]) AND j.id = a.id AND j.lease_token = a.token
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
-- Move held jobs to the dead letters with their error, in one call.
SELECT id FROM {schema}.fail_jobs(%(ids)b::bigint[], %(tokens)b::uuid[], %(reasons)b::text[],
                                  %(errors)b::text[], %(block_keys)b::boolean[]) AS id

-- name: release_jobs
-- Give held jobs back at once (shutdown, prefetched but never started); the attempt
-- counted at claim is returned because the job never got its chance.
UPDATE {schema}.jobs AS j
SET state = 'available', attempts = greatest(j.attempts - 1, 0),
    lease_token = NULL, lease_expires_at = NULL, worker_id = NULL, heartbeat_at = NULL
FROM unnest(%(ids)b::bigint[], %(tokens)b::uuid[]) AS a(id, token)
WHERE j.id = ANY(%(ids)b::bigint[]) AND j.id = a.id AND j.lease_token = a.token
RETURNING j.id

-- name: heartbeat_jobs
-- Extend the leases this worker still holds; a missing id in the result is a lost lease.
UPDATE {schema}.jobs AS j
SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s), heartbeat_at = now()
FROM unnest(%(ids)b::bigint[], %(tokens)b::uuid[]) AS a(id, token)
WHERE j.id = ANY(%(ids)b::bigint[]) AND j.id = a.id AND j.lease_token = a.token
RETURNING j.id

-- name: complete_job_in_transaction
-- The ack of one job inside the handler's own transaction (effectively-once DB effects).
SELECT id FROM {schema}.complete_jobs(ARRAY[%(id)s]::bigint[], ARRAY[%(token)s]::uuid[]) AS id

-- name: rescue_expired
-- Jobs whose lease ran out go back to the queue, or to the dead letters when out of attempts.
SELECT requeued, dead FROM {schema}.rescue_expired_jobs(%(limit)s, %(default_max_attempts)s)

-- name: advance_stalled_keys
-- Self-healing for ordering keys left without an active head.
SELECT {schema}.advance_stalled_keys(%(limit)s) AS advanced
