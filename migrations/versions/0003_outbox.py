"""Outbox: messages published in the caller's transaction, claimed by relays, per-key order.

Revision ID: 0003_outbox
Revises: 0002_flow_control
Create Date: 2026-11-25

Relays never remember "the last id seen": ids are not commit-ordered, so a message whose
transaction commits late would be skipped. They claim whatever is pending with
FOR UPDATE SKIP LOCKED instead. Per-key order comes from ordering_keys (scope 'outbox'):
publishers of one key serialize on its row, so key_seq follows commit order, and only
the oldest live message of a key is ever 'pending' or 'inflight'.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

revision = "0003_outbox"
down_revision = "0002_flow_control"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def _schema() -> str:
    from pgqueue.names import schema_name

    return schema_name(context.config.attributes.get("pgqueue_schema") or "pgqueue")


def upgrade() -> None:
    s = _schema()
    now = sa.text("now()")
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True)),
        sa.Column(
            "message_id", pg.UUID, nullable=False, server_default=sa.text("gen_random_uuid()")
        ),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("key", sa.Text),
        sa.Column("key_seq", sa.BigInteger),
        sa.Column("payload", pg.JSONB, nullable=False),
        sa.Column("headers", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'pending'::text")),
        sa.Column("available_at", TZ, nullable=False, server_default=now),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("lease_token", pg.UUID),
        sa.Column("lease_expires_at", TZ),
        sa.Column("relay_id", pg.UUID),
        sa.Column("claimed_at", TZ),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", TZ, nullable=False, server_default=now),
        sa.PrimaryKeyConstraint("id", name="outbox_pkey"),
        sa.CheckConstraint(
            "state IN ('pending', 'inflight', 'waiting')", name="outbox_state_check"
        ),
        sa.CheckConstraint("pg_column_size(payload) <= 262144", name="outbox_payload_size_check"),
        sa.CheckConstraint(
            "(state = 'inflight') = (lease_token IS NOT NULL)"
            " AND (state <> 'inflight' OR lease_expires_at IS NOT NULL)",
            name="outbox_inflight_lease_check",
        ),
        schema=s,
    )
    op.create_index(
        "outbox_claim_idx",
        "outbox",
        ["available_at", "id"],
        schema=s,
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "outbox_lease_idx",
        "outbox",
        ["lease_expires_at"],
        schema=s,
        postgresql_where=sa.text("state = 'inflight'"),
    )
    op.create_index(
        "outbox_key_active_idx",
        "outbox",
        ["key"],
        schema=s,
        postgresql_where=sa.text("key IS NOT NULL AND state IN ('pending', 'inflight')"),
    )
    op.create_index(
        "outbox_key_waiting_idx",
        "outbox",
        ["key", "key_seq"],
        schema=s,
        postgresql_where=sa.text("state = 'waiting'"),
    )
    op.execute(
        sa.text(
            f'ALTER TABLE "{s}".outbox SET (fillfactor = 85, '
            "autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000, "
            "autovacuum_vacuum_insert_scale_factor = 0.05, "
            "autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 1000, "
            "autovacuum_vacuum_cost_delay = 0)"
        )
    )
    op.create_table(
        "outbox_dead",
        sa.Column("id", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("message_id", pg.UUID, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("key", sa.Text),
        sa.Column("key_seq", sa.BigInteger),
        sa.Column("payload", pg.JSONB, nullable=False),
        sa.Column("headers", pg.JSONB, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("blocks_key", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("failed_at", TZ, nullable=False, server_default=now),
        sa.PrimaryKeyConstraint("id", name="outbox_dead_pkey"),
        schema=s,
    )
    op.create_index("outbox_dead_failed_idx", "outbox_dead", ["failed_at"], schema=s)
    op.create_index(
        "outbox_dead_key_idx",
        "outbox_dead",
        ["key"],
        schema=s,
        postgresql_where=sa.text("blocks_key"),
    )
    op.create_table(
        "outbox_delivered",
        sa.Column("id", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("message_id", pg.UUID, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("key", sa.Text),
        sa.Column("payload", pg.JSONB, nullable=False),
        sa.Column("headers", pg.JSONB, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("sink", sa.Text),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("delivered_at", TZ, nullable=False, server_default=now),
        sa.PrimaryKeyConstraint("id", name="outbox_delivered_pkey"),
        schema=s,
    )
    op.create_index("outbox_delivered_at_idx", "outbox_delivered", ["delivered_at"], schema=s)
    op.create_table(
        "outbox_throughput",
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("minute", TZ, nullable=False),
        sa.Column("delivered", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("failed", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("topic", "minute", name="outbox_throughput_pkey"),
        schema=s,
    )
    for statement in _functions(s):
        op.execute(sa.text(statement))


def _functions(s: str) -> list[str]:
    channel = f"'pgqueue_' || left(md5('{s}:outbox'), 24)"
    return [
        # Promote the next waiting message of each given key that has nothing pending or in
        # flight and no blocking dead letter. Set-based: one relay batch finishing 1,000 keys
        # costs three statements, not 1,000 function calls. The key rows are locked (and
        # bumped, so REPEATABLE READ publishers racing with us fail instead of parking a
        # message) in key order first; the promotion then runs with a fresh snapshot.
        f"""
CREATE FUNCTION "{s}".outbox_keys_advance(p_keys text[]) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    promoted bigint;
BEGIN
    UPDATE "{s}".ordering_keys SET updated_at = now()
    WHERE (scope, key) IN (SELECT scope, key FROM "{s}".ordering_keys
                           WHERE scope = 'outbox' AND key = ANY(p_keys)
                           ORDER BY key FOR UPDATE);
    WITH heads AS (
        SELECT h.id
        FROM (SELECT DISTINCT u.key FROM unnest(p_keys) AS u(key)) AS k
        CROSS JOIN LATERAL (
            SELECT o.id FROM "{s}".outbox AS o
            WHERE o.key = k.key AND o.state = 'waiting'
            ORDER BY o.key_seq LIMIT 1
        ) AS h
        WHERE NOT EXISTS (SELECT 1 FROM "{s}".outbox AS a
                          WHERE a.key = k.key AND a.state IN ('pending', 'inflight'))
          AND NOT EXISTS (SELECT 1 FROM "{s}".outbox_dead AS d
                          WHERE d.key = k.key AND d.blocks_key)
    ), moved AS (
        UPDATE "{s}".outbox AS o SET state = 'pending'
        WHERE o.id IN (SELECT id FROM heads)
        RETURNING o.id
    )
    SELECT count(*) INTO promoted FROM moved;
    IF promoted > 0 THEN
        PERFORM pg_notify({channel}, '');
    END IF;
    RETURN promoted;
END
$$""",
        f"""
CREATE FUNCTION "{s}".outbox_key_advance(p_key text) RETURNS bigint
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT "{s}".outbox_keys_advance(ARRAY[p_key])
$$""",
        f"""
CREATE FUNCTION "{s}".publish_messages(
    p_topic text[], p_key text[], p_payload jsonb[], p_headers jsonb[], p_delay float8[]
) RETURNS TABLE (pos bigint, id bigint, message_id uuid)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    key_names text[];
    key_tops bigint[];
    id_sequence regclass := pg_get_serial_sequence('"{s}".outbox', 'id')::regclass;
BEGIN
    RETURN QUERY
    WITH rows AS MATERIALIZED (
        SELECT nextval(id_sequence) AS id, gen_random_uuid() AS message_id, u.*
        FROM unnest(p_topic, p_key, p_payload, p_headers, p_delay)
            WITH ORDINALITY AS u(topic, key, payload, headers, delay, pos)
        WHERE u.key IS NULL
    ), inserted AS (
        INSERT INTO "{s}".outbox (id, message_id, topic, payload, headers, available_at)
        OVERRIDING SYSTEM VALUE
        SELECT id, message_id, topic, payload, headers, now() + make_interval(secs => delay)
        FROM rows
    )
    SELECT r.pos, r.id, r.message_id FROM rows AS r;

    -- Keyed messages, set-based: first take every key's lock (in key order, so concurrent
    -- publishers cannot deadlock) and reserve a block of sequence numbers per key...
    WITH reserved AS (
        INSERT INTO "{s}".ordering_keys AS k (scope, key, last_seq)
        SELECT 'outbox', u.key, count(*) FROM unnest(p_key) AS u(key)
        WHERE u.key IS NOT NULL GROUP BY u.key ORDER BY u.key
        ON CONFLICT (scope, key) DO UPDATE
            SET last_seq = k.last_seq + excluded.last_seq, updated_at = now()
        RETURNING k.key, k.last_seq
    )
    SELECT array_agg(key), array_agg(last_seq) INTO key_names, key_tops FROM reserved;
    IF key_names IS NULL THEN
        PERFORM pg_notify({channel}, '');
        RETURN;
    END IF;
    -- ...then, in a new statement whose snapshot follows those locks, see which keys
    -- already have a live message, and insert: only the head of an idle key is pending.
    RETURN QUERY
    WITH tops AS (
        SELECT t.key, t.top,
               EXISTS (SELECT 1 FROM "{s}".outbox AS o
                       WHERE o.key = t.key AND o.state IN ('pending', 'inflight'))
               OR EXISTS (SELECT 1 FROM "{s}".outbox AS o
                          WHERE o.key = t.key AND o.state = 'waiting')
               OR EXISTS (SELECT 1 FROM "{s}".outbox_dead AS d
                          WHERE d.key = t.key AND d.blocks_key) AS is_active
        FROM unnest(key_names, key_tops) AS t(key, top)
    ), keyed AS MATERIALIZED (
        SELECT nextval(id_sequence) AS id, gen_random_uuid() AS message_id, u.*,
               row_number() OVER (PARTITION BY u.key ORDER BY u.pos) AS rank,
               count(*) OVER (PARTITION BY u.key) AS n
        FROM unnest(p_topic, p_key, p_payload, p_headers, p_delay)
            WITH ORDINALITY AS u(topic, key, payload, headers, delay, pos)
        WHERE u.key IS NOT NULL
    ), inserted AS (
        INSERT INTO "{s}".outbox
            (id, message_id, topic, key, key_seq, payload, headers, available_at, state)
        OVERRIDING SYSTEM VALUE
        SELECT k.id, k.message_id, k.topic, k.key, t.top - k.n + k.rank, k.payload, k.headers,
               now() + make_interval(secs => k.delay),
               CASE WHEN k.rank = 1 AND NOT t.is_active THEN 'pending' ELSE 'waiting' END
        FROM keyed AS k JOIN tops AS t ON t.key = k.key
    )
    SELECT k.pos, k.id, k.message_id FROM keyed AS k;
    PERFORM pg_notify({channel}, '');
END
$$""",
        f"""
CREATE FUNCTION "{s}".claim_messages(p_limit int, p_relay uuid, p_lease_seconds float8)
RETURNS SETOF "{s}".outbox
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH candidates AS (
        SELECT o.id FROM "{s}".outbox AS o
        WHERE o.state = 'pending' AND o.available_at <= now()
        ORDER BY o.available_at, o.id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    -- The subquery runs once: one fresh token per claim, shared by its messages.
    UPDATE "{s}".outbox AS o
    SET state = 'inflight', attempts = o.attempts + 1, lease_token = (SELECT gen_random_uuid()),
        lease_expires_at = now() + make_interval(secs => p_lease_seconds),
        relay_id = p_relay, claimed_at = now()
    -- Primary-key lookups whatever the statistics say (a join could become a hash join
    -- over a sequential scan of the table, as the job claim found).
    WHERE o.id = ANY(ARRAY(SELECT c.id FROM candidates AS c))
    RETURNING o.*
$$""",
        f"""
CREATE FUNCTION "{s}".complete_messages(
    p_ids bigint[], p_tokens uuid[], p_sinks text[], p_keep_history boolean
) RETURNS SETOF bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    done_ids bigint[];
    done_keys text[];
    k text;
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
    IF done_keys IS NOT NULL THEN
        PERFORM "{s}".outbox_keys_advance(done_keys);
    END IF;
    RETURN QUERY SELECT unnest(done_ids);
END
$$""",
        f"""
CREATE FUNCTION "{s}".fail_messages(
    p_ids bigint[], p_tokens uuid[], p_reasons text[], p_errors text[], p_block_keys boolean[]
) RETURNS SETOF bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    dead_ids bigint[];
    free_keys text[];
    k text;
BEGIN
    WITH dead AS (
        DELETE FROM "{s}".outbox AS o
        USING unnest(p_ids, p_tokens, p_reasons, p_errors, p_block_keys)
            AS a(id, token, reason, error, block_key)
        WHERE o.id = ANY(p_ids) AND o.id = a.id AND o.lease_token = a.token
        RETURNING o.*, a.reason AS dead_reason, a.error AS dead_error,
                  (o.key IS NOT NULL AND a.block_key) AS dead_blocks
    ), moved AS (
        INSERT INTO "{s}".outbox_dead
            (id, message_id, topic, key, key_seq, payload, headers, attempts, reason,
             last_error, blocks_key, created_at)
        SELECT id, message_id, topic, key, key_seq, payload, headers, attempts, dead_reason,
               coalesce(dead_error, last_error), dead_blocks, created_at
        FROM dead
    ), counted AS (
        INSERT INTO "{s}".outbox_throughput AS t (topic, minute, failed)
        SELECT topic, date_trunc('minute', now()), count(*) FROM dead GROUP BY topic
        ORDER BY topic
        ON CONFLICT (topic, minute) DO UPDATE SET failed = t.failed + excluded.failed
    )
    SELECT array_agg(id), array_agg(key) FILTER (WHERE key IS NOT NULL AND NOT dead_blocks)
    INTO dead_ids, free_keys FROM dead;
    IF free_keys IS NOT NULL THEN
        PERFORM "{s}".outbox_keys_advance(free_keys);
    END IF;
    RETURN QUERY SELECT unnest(dead_ids);
END
$$""",
        f"""
CREATE FUNCTION "{s}".rescue_expired_messages(p_limit int) RETURNS bigint
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH expired AS (
        SELECT id FROM "{s}".outbox
        WHERE state = 'inflight' AND lease_expires_at < now()
        ORDER BY lease_expires_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), back AS (
        UPDATE "{s}".outbox AS o
        SET state = 'pending', available_at = now(),
            last_error = 'lease expired on relay ' || coalesce(o.relay_id::text, '?')
                         || ' during attempt ' || o.attempts,
            lease_token = NULL, lease_expires_at = NULL, relay_id = NULL
        FROM expired AS e
        WHERE o.id = e.id
        RETURNING o.id
    )
    SELECT count(*) FROM back
$$""",
    ]


def downgrade() -> None:
    s = _schema()
    for function in (
        "rescue_expired_messages(int)",
        "fail_messages(bigint[], uuid[], text[], text[], boolean[])",
        "complete_messages(bigint[], uuid[], text[], boolean)",
        "claim_messages(int, uuid, float8)",
        "publish_messages(text[], text[], jsonb[], jsonb[], float8[])",
        "outbox_key_advance(text)",
        "outbox_keys_advance(text[])",
    ):
        op.execute(sa.text(f'DROP FUNCTION IF EXISTS "{s}".{function}'))
    for table in ("outbox_throughput", "outbox_delivered", "outbox_dead", "outbox"):
        op.drop_table(table, schema=s)
