-- Named queries on queue settings: pause, limits, depth. Workers read them in claim_jobs.

-- name: configure_queue
-- Create or update a queue's settings; a NULL parameter with its flag false keeps the value.
INSERT INTO {schema}.queues AS q
    (name, is_paused, concurrency_limit, rate_limit, rate_interval_seconds, max_depth)
VALUES (%(name)s, coalesce(%(is_paused)s, false), %(concurrency_limit)s, %(rate_limit)s,
        %(rate_interval_seconds)s, %(max_depth)s)
ON CONFLICT (name) DO UPDATE SET
    is_paused = coalesce(%(is_paused)s, q.is_paused),
    concurrency_limit = CASE WHEN %(set_concurrency)s THEN %(concurrency_limit)s
                             ELSE q.concurrency_limit END,
    rate_limit = CASE WHEN %(set_rate)s THEN %(rate_limit)s ELSE q.rate_limit END,
    rate_interval_seconds = CASE WHEN %(set_rate)s THEN %(rate_interval_seconds)s
                                 ELSE q.rate_interval_seconds END,
    rate_tokens = CASE WHEN %(set_rate)s THEN NULL ELSE q.rate_tokens END,
    rate_updated_at = CASE WHEN %(set_rate)s THEN NULL ELSE q.rate_updated_at END,
    max_depth = CASE WHEN %(set_depth)s THEN %(max_depth)s ELSE q.max_depth END,
    updated_at = now()
RETURNING name, is_paused, concurrency_limit, rate_limit, rate_interval_seconds, max_depth

-- name: list_queues
-- Settings of every known queue, for `pgqueue queues list` and `status`.
SELECT name, is_paused, concurrency_limit, rate_limit, rate_interval_seconds, max_depth,
       updated_at
FROM {schema}.queues ORDER BY name
