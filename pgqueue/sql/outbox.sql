-- Named queries on the outbox tables.

-- name: publish_messages
-- Any number of messages in one round trip; keyed ones take their key's lock, in key order.
SELECT pos, id, message_id
FROM {schema}.publish_messages(%(topic)s::text[], %(key)s::text[], %(payload)s::jsonb[],
                               %(headers)s::jsonb[], %(delay)s::float8[])
ORDER BY pos

-- name: claim_messages
-- Lease up to %(limit)s committed, due messages; only key heads are ever pending. The
-- payload comes as its JSON text: sinks that forward JSON send it as is, others decode it.
SELECT id, lease_token, message_id::text, topic, key, payload::text, headers, attempts,
       created_at
FROM {schema}.claim_messages(%(limit)s, %(relay_id)s, %(lease_seconds)s)

-- name: complete_messages
-- Delivered: delete (keeping history when retention is on) and move the keys on. Rows with a
-- lease_token are each key's next message, handed to the relay given (none without one),
-- with the columns of claim_messages.
SELECT id, lease_token, message_id::text, topic, key, payload::text, headers, attempts,
       created_at
FROM {schema}.complete_messages(%(ids)b::bigint[], %(tokens)b::uuid[], %(sinks)b::text[],
                                %(keep_history)s, %(relay_id)s::uuid,
                                %(lease_seconds)s::float8)

-- name: retry_messages
-- Back to pending after a delay on the database clock; a snooze gives the attempt back.
UPDATE {schema}.outbox AS o
SET state = 'pending',
    available_at = now() + make_interval(secs => a.delay),
    attempts = o.attempts - CASE WHEN a.is_snooze THEN 1 ELSE 0 END,
    last_error = coalesce(a.error, o.last_error),
    lease_token = NULL, lease_expires_at = NULL, relay_id = NULL
FROM unnest(%(ids)b::bigint[], %(tokens)b::uuid[], %(delays)b::float8[],
            %(errors)b::text[], %(snoozes)b::bool[]) AS a(id, token, delay, error, is_snooze)
WHERE o.id = ANY(%(ids)b::bigint[]) AND o.id = a.id AND o.lease_token = a.token
RETURNING o.id

-- name: fail_messages
-- To the outbox dead letters; the key stays blocked unless the route says continue.
SELECT id FROM {schema}.fail_messages(%(ids)b::bigint[], %(tokens)b::uuid[], %(reasons)b::text[],
                                      %(errors)b::text[], %(block_keys)b::boolean[]) AS id

-- name: release_messages
-- Give messages back at once (shutdown); the attempt is returned.
UPDATE {schema}.outbox AS o
SET state = 'pending', attempts = greatest(o.attempts - 1, 0),
    lease_token = NULL, lease_expires_at = NULL, relay_id = NULL
FROM unnest(%(ids)b::bigint[], %(tokens)b::uuid[]) AS a(id, token)
WHERE o.id = ANY(%(ids)b::bigint[]) AND o.id = a.id AND o.lease_token = a.token
RETURNING o.id

-- name: heartbeat_messages
-- Extend the leases this relay still holds; a missing id is a lost lease.
UPDATE {schema}.outbox AS o
SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
FROM unnest(%(ids)b::bigint[], %(tokens)b::uuid[]) AS a(id, token)
WHERE o.id = ANY(%(ids)b::bigint[]) AND o.id = a.id AND o.lease_token = a.token
RETURNING o.id

-- name: rescue_expired_messages
-- Messages of a dead relay go back to pending.
SELECT {schema}.rescue_expired_messages(%(limit)s) AS requeued

-- name: pending_topics
-- A bounded sample of topics waiting for delivery, to check routes at relay start.
SELECT DISTINCT topic FROM (
    SELECT topic FROM {schema}.outbox WHERE state IN ('pending', 'waiting') LIMIT 10000
) AS sample

-- name: prune_delivered
-- Drop delivered history past its retention, in small batches (no long locks).
WITH old AS (
    SELECT id FROM {schema}.outbox_delivered
    WHERE delivered_at < now() - make_interval(secs => %(retention_seconds)s)
    ORDER BY delivered_at LIMIT %(limit)s
)
DELETE FROM {schema}.outbox_delivered AS d USING old WHERE d.id = old.id

-- name: prune_outbox_throughput
-- Keep a day of per-minute outbox counters.
DELETE FROM {schema}.outbox_throughput WHERE minute < now() - interval '1 day'

-- name: outbox_status
-- Per topic: pending, waiting behind a key, in flight, dead, oldest pending age.
WITH live AS (
    SELECT topic,
           count(*) FILTER (WHERE state = 'pending') AS pending,
           count(*) FILTER (WHERE state = 'waiting') AS waiting,
           count(*) FILTER (WHERE state = 'inflight') AS in_flight,
           min(created_at) FILTER (WHERE state = 'pending' AND available_at <= now())
               AS oldest_pending_at
    FROM {schema}.outbox GROUP BY topic
), dead AS (
    SELECT topic, count(*) AS dead FROM {schema}.outbox_dead GROUP BY topic
)
SELECT coalesce(l.topic, d.topic) AS topic,
       coalesce(l.pending, 0) AS pending, coalesce(l.waiting, 0) AS waiting,
       coalesce(l.in_flight, 0) AS in_flight, coalesce(d.dead, 0) AS dead,
       coalesce(extract(epoch FROM now() - l.oldest_pending_at), 0)::float8
           AS oldest_pending_seconds
FROM live AS l FULL JOIN dead AS d ON d.topic = l.topic
ORDER BY 1

-- name: lock_requeued_message_keys
-- Before requeue_dead_messages, in the same transaction: lock (and bump, as publishers and
-- relays do) the keys of the dead messages it will move, in key order, so that its check
-- for a live message of each key sees every publish and promotion of that key.
UPDATE {schema}.ordering_keys SET updated_at = now()
WHERE (scope, key) IN (
    SELECT k.scope, k.key FROM {schema}.ordering_keys AS k
    WHERE k.scope = 'outbox' AND k.key IN (
        SELECT d.key FROM {schema}.outbox_dead AS d
        WHERE d.key IS NOT NULL
          AND (%(topic)s::text IS NULL OR d.topic = %(topic)s)
          AND (%(ids)b::bigint[] IS NULL OR d.id = ANY(%(ids)b::bigint[])))
    ORDER BY k.key FOR UPDATE)

-- name: requeue_dead_messages
-- Move dead messages back to the outbox (same message id): a key's blocking head goes
-- back as its head; others rejoin their key's line. Run lock_requeued_message_keys first.
WITH picked AS (
    DELETE FROM {schema}.outbox_dead AS d
    WHERE (%(topic)s::text IS NULL OR d.topic = %(topic)s)
      AND (%(ids)b::bigint[] IS NULL OR d.id = ANY(%(ids)b::bigint[]))
    RETURNING d.*
)
INSERT INTO {schema}.outbox AS o
    (id, message_id, topic, key, key_seq, payload, headers, state, attempts, created_at)
OVERRIDING SYSTEM VALUE
SELECT id, message_id, topic, key, key_seq, payload, headers,
       CASE WHEN key IS NULL OR blocks_key
                 OR NOT EXISTS (SELECT 1 FROM {schema}.outbox AS x
                                WHERE x.key = picked.key
                                  AND x.state IN ('pending', 'inflight'))
            THEN 'pending' ELSE 'waiting' END,
       0, created_at
FROM picked
RETURNING o.id

-- name: notify_outbox
-- Wake the relays (after an operator requeue, for instance).
SELECT pg_notify(%(channel)s, '')
