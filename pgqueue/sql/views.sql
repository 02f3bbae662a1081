-- Named queries over the operator views.

-- name: queue_stats
-- Everything `pgqueue status` shows, one row per queue.
SELECT * FROM {schema}.queue_stats ORDER BY queue

-- name: dead_letter_list
-- The most recent dead letters, newest first.
SELECT * FROM {schema}.dead_letters ORDER BY failed_at DESC, job_id DESC LIMIT %(limit)s
