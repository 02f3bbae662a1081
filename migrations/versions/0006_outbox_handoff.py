"""Outbox handoff: the relay that settles a key's message leases that key's next one.

Revision ID: 0006_outbox_handoff
Revises: 0005_claim_hints
Create Date: 2026-11-26

Before, a delivered keyed message made its key's next message pending, with a NOTIFY; a
relay heard it through the server and claimed the message in a second transaction. For a
busy key that is a NOTIFY, two updates of the row and a claim per message, and a
notification's round trip between two messages of one key. Now complete_messages can take
the relay and a lease: a key's next message goes straight to that relay, in flight, in the
write that settled its predecessor, and comes back in its result, when it is due, no older
due message is pending (a handoff never jumps the queue), and a draw with chance 1/n comes
up when n relays are alive (so keys spread over relays instead of staying with the first).
Order per key is as before: one message of a key in flight at a time, the next only after
its predecessor was written as delivered. A next message not handed over becomes pending as
before, and only then does the write notify.

outbox_keys_promote is the one place that moves keys to their next messages, for both uses;
outbox_keys_advance(text[]) keeps its name and result on top of it. The new complete_messages
takes two more parameters and returns rows; the four-parameter form stays, as a wrapper that
hands nothing over, so relays of the previous version keep working against this schema
while a deployment rolls (with the grants it had; the new form gets the same grants).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from pgqueue.migrations.functions import earlier_definition, replace_function

revision = "0006_outbox_handoff"
down_revision = "0005_claim_hints"
branch_labels = None
depends_on = None

ADVANCE = "outbox_keys_advance(text[])"
PROMOTE = "outbox_keys_promote(text[], uuid, float8)"
OLD_COMPLETE = "complete_messages(bigint[], uuid[], text[], boolean)"
NEW_COMPLETE = "complete_messages(bigint[], uuid[], text[], boolean, uuid, float8)"


def _schema() -> str:
    from pgqueue.names import schema_name

    return schema_name(context.config.attributes.get("pgqueue_schema") or "pgqueue")


def upgrade() -> None:
    s = _schema()
    replace_function(s, None, PROMOTE, _promote(s), grants_from=ADVANCE)
    replace_function(s, ADVANCE, ADVANCE, _advance(s))
    replace_function(s, None, NEW_COMPLETE, _complete(s), grants_from=OLD_COMPLETE)
    replace_function(s, OLD_COMPLETE, OLD_COMPLETE, _complete_without_handoff(s))


def downgrade() -> None:
    s = _schema()
    op.execute(sa.text(f'DROP FUNCTION IF EXISTS "{s}".{NEW_COMPLETE}'))
    # The definitions of revision 0003, read from that revision rather than copied here.
    for signature, name in ((OLD_COMPLETE, "complete_messages"), (ADVANCE, "outbox_keys_advance")):
        previous = earlier_definition(s, "0003_outbox.py", name)
        replace_function(s, signature, signature, previous)
    op.execute(sa.text(f'DROP FUNCTION IF EXISTS "{s}".{PROMOTE}'))


def _promote(s: str) -> str:
    channel = f"'pgqueue_' || left(md5('{s}:outbox'), 24)"
    return f"""
CREATE FUNCTION "{s}".outbox_keys_promote(p_keys text[], p_relay uuid, p_lease_seconds float8)
RETURNS SETOF "{s}".outbox
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
-- Move each given key that has nothing pending or in flight and no blocking dead letter to
-- its next waiting message, and return the moved rows: state 'inflight' for those handed
-- to p_relay under one fresh lease, 'pending' for the rest (then with a NOTIFY). A message
-- is handed over when a relay is given, it is due, no older due message is pending, and,
-- with n relays alive, a draw with chance 1/n comes up. Set-based: a relay batch finishing
-- 1,000 keys costs a handful of statements. The key rows are locked (and bumped, so
-- REPEATABLE READ publishers racing with us fail instead of parking a message) in key order
-- first; the promotion then runs with a fresh snapshot.
DECLARE
    head_ids bigint[];
    head_ats timestamptz[];
    relays bigint;
    oldest_at timestamptz;
    oldest_id bigint;
    taken bigint[];
    freed bigint[];
    moved "{s}".outbox;
BEGIN
    UPDATE "{s}".ordering_keys SET updated_at = now()
    WHERE (scope, key) IN (SELECT scope, key FROM "{s}".ordering_keys
                           WHERE scope = 'outbox' AND key = ANY(p_keys)
                           ORDER BY key FOR UPDATE);
    SELECT array_agg(h.id), array_agg(h.available_at) INTO head_ids, head_ats
    FROM (SELECT DISTINCT u.key FROM unnest(p_keys) AS u(key)) AS k
    CROSS JOIN LATERAL (
        SELECT o.id, o.available_at FROM "{s}".outbox AS o
        WHERE o.key = k.key AND o.state = 'waiting'
        ORDER BY o.key_seq LIMIT 1
    ) AS h
    WHERE NOT EXISTS (SELECT 1 FROM "{s}".outbox AS a
                      WHERE a.key = k.key AND a.state IN ('pending', 'inflight'))
      AND NOT EXISTS (SELECT 1 FROM "{s}".outbox_dead AS d
                      WHERE d.key = k.key AND d.blocks_key);
    IF head_ids IS NULL THEN
        RETURN;
    END IF;
    freed := head_ids;
    -- The two probes only when something could be handed over.
    IF p_relay IS NOT NULL AND EXISTS (SELECT 1 FROM unnest(head_ats) AS a(at) WHERE at <= now())
    THEN
        SELECT count(*) INTO relays FROM "{s}".processes
        WHERE kind = 'relay'
          AND heartbeat_at > now() - make_interval(secs => coalesce(p_lease_seconds, 60));
        SELECT o.available_at, o.id INTO oldest_at, oldest_id FROM "{s}".outbox AS o
        WHERE o.state = 'pending' AND o.available_at <= now()
        ORDER BY o.available_at, o.id LIMIT 1;
        SELECT array_agg(c.id) FILTER (WHERE c.is_taken),
               array_agg(c.id) FILTER (WHERE NOT c.is_taken)
        INTO taken, freed
        FROM (SELECT u.id,
                     u.at <= now()
                     AND (oldest_id IS NULL OR (u.at, u.id) < (oldest_at, oldest_id))
                     AND (relays <= 1 OR random() * relays < 1) AS is_taken
              FROM unnest(head_ids, head_ats) AS u(id, at)) AS c;
    END IF;
    -- Primary-key lookups whatever the statistics say.
    IF freed IS NOT NULL THEN
        FOR moved IN
            UPDATE "{s}".outbox AS o SET state = 'pending' WHERE o.id = ANY(freed) RETURNING o.*
        LOOP
            RETURN NEXT moved;
        END LOOP;
        PERFORM pg_notify({channel}, '');
    END IF;
    IF taken IS NOT NULL THEN
        FOR moved IN
            UPDATE "{s}".outbox AS o
            SET state = 'inflight', attempts = o.attempts + 1,
                lease_token = (SELECT gen_random_uuid()),
                lease_expires_at = now() + make_interval(secs => p_lease_seconds),
                relay_id = p_relay, claimed_at = now()
            WHERE o.id = ANY(taken)
            RETURNING o.*
        LOOP
            RETURN NEXT moved;
        END LOOP;
    END IF;
    RETURN;
END
$$"""


def _advance(s: str) -> str:
    return f"""
CREATE FUNCTION "{s}".outbox_keys_advance(p_keys text[]) RETURNS bigint
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    -- Without a relay nothing is handed over: every moved message is pending (and notified).
    SELECT count(*) FROM "{s}".outbox_keys_promote(p_keys, NULL, NULL)
$$"""


def _complete(s: str) -> str:
    return f"""
CREATE FUNCTION "{s}".complete_messages(
    p_ids bigint[], p_tokens uuid[], p_sinks text[], p_keep_history boolean,
    p_relay uuid, p_lease_seconds float8
) RETURNS TABLE (
    id bigint, lease_token uuid, message_id uuid, topic text, key text, payload jsonb,
    headers jsonb, attempts int, created_at timestamptz
)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
-- Delivered: delete (keeping history when asked) and move the keys on. Returns the id of
-- each message written as delivered (lease_token NULL), then the messages handed to
-- p_relay (see outbox_keys_promote; none when p_relay is NULL).
DECLARE
    done_ids bigint[];
    done_keys text[];
BEGIN
    WITH done AS (
        DELETE FROM "{s}".outbox AS o
        USING unnest(p_ids, p_tokens, p_sinks) AS a(id, token, sink)
        WHERE o.id = ANY(p_ids) AND o.id = a.id AND o.lease_token = a.token
        RETURNING o.*, a.sink AS delivered_by
    ), kept AS (
        INSERT INTO "{s}".outbox_delivered
            (id, message_id, topic, key, payload, headers, attempts, sink, created_at)
        SELECT id, message_id, topic, key, payload, headers, attempts, delivered_by, created_at
        FROM done WHERE p_keep_history
    ), counted AS (
        INSERT INTO "{s}".outbox_throughput AS t (topic, minute, delivered)
        SELECT topic, date_trunc('minute', now()), count(*) FROM done GROUP BY topic
        ORDER BY topic
        ON CONFLICT (topic, minute) DO UPDATE SET delivered = t.delivered + excluded.delivered
    )
    SELECT array_agg(id), array_agg(key) FILTER (WHERE key IS NOT NULL)
    INTO done_ids, done_keys FROM done;
    RETURN QUERY
    SELECT d.id, NULL::uuid, NULL::uuid, NULL::text, NULL::text, NULL::jsonb, NULL::jsonb,
           NULL::int, NULL::timestamptz
    FROM unnest(done_ids) AS d(id);
    IF done_keys IS NOT NULL THEN
        RETURN QUERY
        SELECT n.id, n.lease_token, n.message_id, n.topic, n.key, n.payload, n.headers,
               n.attempts, n.created_at
        FROM "{s}".outbox_keys_promote(done_keys, p_relay, p_lease_seconds) AS n
        WHERE n.state = 'inflight';
    END IF;
END
$$"""


def _complete_without_handoff(s: str) -> str:
    return f"""
CREATE FUNCTION "{s}".complete_messages(
    p_ids bigint[], p_tokens uuid[], p_sinks text[], p_keep_history boolean
) RETURNS SETOF bigint
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    -- The form relays of the previous version call: nothing is handed over.
    SELECT c.id FROM "{s}".complete_messages(p_ids, p_tokens, p_sinks, p_keep_history,
                                             NULL, NULL) AS c
$$"""
