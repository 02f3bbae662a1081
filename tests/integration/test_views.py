"""The operator views against real PostgreSQL: documented columns, right numbers on a seeded
database, and index-only plans on a backlog of 1,000,000 jobs.

``seed`` builds every state an operator meets through pgqueue's own functions (claim, fail,
retry, cancel, publish...), then ages a few timestamps by SQL so that lags are known.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import pgqueue
from pgqueue import db

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
VIEWS = (
    "queue_stats",
    "running_jobs",
    "dead_letters",
    "blocked_keys",
    "outbox_backlog",
    "workers",
    "health",
)
WORKER_STALE = uuid.UUID("00000000-0000-0000-0000-00000000000a")
WORKER_LIVE = uuid.UUID("00000000-0000-0000-0000-00000000000b")
RELAY = uuid.UUID("00000000-0000-0000-0000-00000000000c")


def documented_columns(relation: str) -> list[tuple[str, str]]:
    """(column, type) rows of the table under the heading ``### `pgqueue.<relation>` ``, or
    for audit_log and job_events the table that follows its first mention as a heading-less
    section (the first table after the line that introduces it)."""
    text = DOCS.read_text("utf-8")
    marker = f"### `pgqueue.{relation}`"
    if marker in text:
        start = text.index(marker)
    else:
        start = text.index(f"`pgqueue.{relation}`")
    table = re.search(
        r"\| column \| type \| meaning \|\n\|---\|---\|---\|\n((?:\|.*\n)+)", text[start:]
    )
    assert table is not None, f"no column table for {relation} in {DOCS}"
    rows = []
    for line in table.group(1).splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((cells[0].strip("`"), cells[1]))
    return rows


def actual_columns(dsn: str, relation: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return [
            (name, kind)
            for name, kind in conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped"
                " ORDER BY attnum",
                (f"pgqueue.{relation}",),
            ).fetchall()
        ]


def select(dsn: str, query: str, params: Any = ()) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(query, params).fetchall()


def claim(conn: psycopg.Connection[Any], queue: str, worker: uuid.UUID) -> tuple[int, Any]:
    row = conn.execute(
        "SELECT id, lease_token FROM pgqueue.claim_jobs(%s, 1, %s, 30, '{}', '{}', 20)",
        (queue, worker),
    ).fetchone()
    assert row is not None, f"nothing to claim in {queue}"
    return row[0], row[1]


def claim_message(conn: psycopg.Connection[Any]) -> tuple[int, Any]:
    row = conn.execute("SELECT id, lease_token FROM pgqueue.claim_messages(1, %s, 30)", (RELAY,))
    found = row.fetchone()
    assert found is not None
    return found[0], found[1]


def seed(dsn: str) -> dict[str, Any]:
    """Every state, with known counts (see the assertions of each view's test)."""
    ids: dict[str, Any] = {}
    queries = db.queries("pgqueue")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgqueue.processes (id, kind, host, pid, queues, concurrency,"
            " started_at, heartbeat_at) VALUES"
            " (%s, 'worker', 'host-a', 111, '{alpha}', 4, now() - interval '1 hour',"
            "  now() - interval '5 minutes'),"
            " (%s, 'worker', 'host-b', 222, '{alpha,beta}', 8, now() - interval '10 minutes',"
            "  now()),"
            " (%s, 'relay', 'host-c', 333, '{webhook}', 64, now(), now())",
            (WORKER_STALE, WORKER_LIVE, RELAY),
        )
        # alpha: a running job whose worker died (lease expired five minutes ago).
        ids["stuck"] = pgqueue.enqueue(conn, "stuck", {}, queue="alpha")
        stuck, _ = claim(conn, "alpha", WORKER_STALE)
        assert stuck == ids["stuck"]
        conn.execute(
            "UPDATE pgqueue.jobs SET claimed_at = now() - interval '10 minutes',"
            " heartbeat_at = now() - interval '6 minutes',"
            " lease_expires_at = now() - interval '5 minutes' WHERE id = %s",
            (stuck,),
        )
        # alpha: a dead head blocking key k-dead, two jobs waiting behind it.
        ids["dead_head"] = pgqueue.enqueue(
            conn, "charge", {"n": 1}, queue="alpha", ordering_key="k-dead"
        )
        for n in (2, 3):
            pgqueue.enqueue(conn, "charge", {"n": n}, queue="alpha", ordering_key="k-dead")
        head, token = claim(conn, "alpha", WORKER_LIVE)
        assert head == ids["dead_head"]
        conn.execute(
            "SELECT pgqueue.fail_jobs(ARRAY[%s]::bigint[], ARRAY[%s]::uuid[],"
            " ARRAY['max_attempts'], ARRAY[%s], ARRAY[true])",
            (head, token, "card declined\nTraceback (most recent call last): ..."),
        )
        # alpha: a head waiting out a retry backoff on key k-retry, one job behind it.
        ids["retry_head"] = pgqueue.enqueue(conn, "sync", {}, queue="alpha", ordering_key="k-retry")
        pgqueue.enqueue(conn, "sync", {}, queue="alpha", ordering_key="k-retry")
        head, token = claim(conn, "alpha", WORKER_LIVE)
        assert head == ids["retry_head"]
        db.run_sync(
            conn,
            queries["retry_jobs"],
            {
                "ids": [head],
                "tokens": [token],
                "delays": [3600.0],
                "errors": ["timeout\nstack"],
                "snoozes": [False],
            },
        )
        # alpha: a ready head on k-wait with one job behind it; two plain ready jobs, the
        # oldest ten minutes old (the lag); one scheduled in an hour.
        pgqueue.enqueue(conn, "mail", {}, queue="alpha", ordering_key="k-wait")
        pgqueue.enqueue(conn, "mail", {}, queue="alpha", ordering_key="k-wait")
        ids["oldest"] = pgqueue.enqueue(conn, "mail", {}, queue="alpha")
        pgqueue.enqueue(conn, "mail", {}, queue="alpha")
        conn.execute(
            "UPDATE pgqueue.jobs SET run_at = now() - interval '10 minutes' WHERE id = %s",
            (ids["oldest"],),
        )
        pgqueue.enqueue(conn, "report", {}, queue="alpha", delay=3600)
        # beta: one completed job, one cancelled by an operator, one ready.
        pgqueue.enqueue(conn, "cleanup", {}, queue="beta")
        done, token = claim(conn, "beta", WORKER_LIVE)
        conn.execute(
            "SELECT pgqueue.complete_jobs(ARRAY[%s]::bigint[], ARRAY[%s]::uuid[])", (done, token)
        )
        ids["cancelled"] = pgqueue.enqueue(conn, "cleanup", {}, queue="beta")
        pgqueue.enqueue(conn, "cleanup", {}, queue="beta")
        conn.execute(
            "SELECT pgqueue.cancel_jobs(ARRAY[%s]::bigint[], 'not needed')", (ids["cancelled"],)
        )
        # idle: a paused queue without jobs.
        pgqueue.pause_queue(conn, "idle")
        # Older throughput: half an hour ago counts for the hour, two hours ago for nothing.
        conn.execute(
            "INSERT INTO pgqueue.queue_throughput (queue, minute, completed, failed, retried)"
            " VALUES ('alpha', date_trunc('minute', now()) - interval '30 minutes', 5, 2, 3),"
            " ('beta', date_trunc('minute', now()) - interval '2 hours', 100, 100, 100)"
        )
        # Outbox: key ok-dead has a dead head and one message behind it (topic orders).
        pgqueue.publish(conn, "orders", {"n": 1}, key="ok-dead")
        pgqueue.publish(conn, "orders", {"n": 2}, key="ok-dead")
        message, token = claim_message(conn)
        ids["dead_message"] = message
        conn.execute(
            "SELECT pgqueue.fail_messages(ARRAY[%s]::bigint[], ARRAY[%s]::uuid[],"
            " ARRAY['rejected'], ARRAY['HTTP 422\nbody'], ARRAY[true])",
            (message, token),
        )
        # Key ok-retry (topic payments): its head waits out a backoff of an hour.
        pgqueue.publish(conn, "payments", {"n": 1}, key="ok-retry")
        message, token = claim_message(conn)
        ids["retry_message"] = message
        db.run_sync(
            conn,
            queries["retry_messages"],
            {
                "ids": [message],
                "tokens": [token],
                "delays": [3600.0],
                "errors": ["HTTP 503"],
                "snoozes": [False],
            },
        )
        # One message in flight, two pending; the oldest pending three minutes old.
        pgqueue.publish(conn, "orders", {"n": 3})
        claim_message(conn)
        ids["old_message"] = pgqueue.publish(conn, "orders", {"n": 4})
        pgqueue.publish(conn, "orders", {"n": 5})
        conn.execute(
            "UPDATE pgqueue.outbox SET created_at = now() - interval '3 minutes'"
            " WHERE message_id = %s",
            (ids["old_message"],),
        )
    return ids


def by(rows: list[dict[str, Any]], key: str) -> dict[Any, dict[str, Any]]:
    return {row[key]: row for row in rows}


# ---------------------------------------------------------------- columns


@pytest.mark.parametrize("relation", [*VIEWS, "audit_log", "job_events"])
def test_views_have_exactly_the_documented_columns_and_types(dsn: str, relation: str) -> None:
    assert actual_columns(dsn, relation) == documented_columns(relation)


# ---------------------------------------------------------------- numbers


def test_queue_stats_counts_every_state_lag_throughput_and_settings(dsn: str) -> None:
    seed(dsn)
    stats = by(select(dsn, "SELECT * FROM pgqueue.queue_stats"), "queue")
    assert set(stats) == {"alpha", "beta", "idle"}
    alpha, beta, idle = stats["alpha"], stats["beta"], stats["idle"]
    counts = ("ready", "scheduled", "running", "waiting", "dead")
    # ready: the k-wait head and two plain jobs; scheduled: the report and the retrying head;
    # waiting: two behind k-dead, one behind k-retry, one behind k-wait.
    assert {c: alpha[c] for c in counts} == {
        "ready": 3,
        "scheduled": 2,
        "running": 1,
        "waiting": 4,
        "dead": 1,
    }
    assert {c: beta[c] for c in counts} == {
        "ready": 1,
        "scheduled": 0,
        "running": 0,
        "waiting": 0,
        "dead": 1,
    }
    assert {c: idle[c] for c in counts} == dict.fromkeys(counts, 0)
    assert timedelta(minutes=10) <= alpha["lag"] < timedelta(minutes=11)
    assert timedelta(0) <= beta["lag"] < timedelta(minutes=1)
    assert idle["lag"] == timedelta(0)
    throughput = (
        "completed_last_minute",
        "failed_last_minute",
        "completed_last_hour",
        "failed_last_hour",
        "retried_last_hour",
    )
    # alpha: one failure and one retry now, plus 5/2/3 half an hour ago; beta: one completion
    # now, and the counts of two hours ago are out of the window.
    assert [alpha[c] for c in throughput] == [0, 1, 5, 3, 4]
    assert [beta[c] for c in throughput] == [1, 0, 1, 0, 0]
    assert (idle["is_paused"], alpha["is_paused"]) == (True, False)
    assert alpha["concurrency_limit"] is None and alpha["max_depth"] is None


def test_running_jobs_show_the_expired_lease_and_its_worker(dsn: str) -> None:
    ids = seed(dsn)
    (row,) = select(dsn, "SELECT * FROM pgqueue.running_jobs")
    assert row["job_id"] == ids["stuck"]
    assert (row["queue"], row["task"], row["attempt"], row["max_attempts"]) == (
        "alpha",
        "stuck",
        1,
        20,
    )
    assert (row["worker_id"], row["worker_host"], row["worker_pid"]) == (
        WORKER_STALE,
        "host-a",
        111,
    )
    assert row["is_lease_expired"] is True
    assert timedelta(minutes=10) <= row["running_for"] < timedelta(minutes=11)
    assert row["lease_expires_at"] < row["heartbeat_at"] + timedelta(minutes=2)
    assert row["ordering_key"] is None


def test_dead_letters_show_reason_first_error_line_and_key(dsn: str) -> None:
    ids = seed(dsn)
    rows = by(select(dsn, "SELECT * FROM pgqueue.dead_letters"), "job_id")
    assert set(rows) == {ids["dead_head"], ids["cancelled"]}
    head = rows[ids["dead_head"]]
    assert (head["queue"], head["task"], head["attempts"], head["reason"]) == (
        "alpha",
        "charge",
        1,
        "max_attempts",
    )
    assert head["error"] == "card declined", "only the first line of the traceback"
    assert (head["ordering_key"], head["blocks_key"], head["args"]) == ("k-dead", True, {"n": 1})
    cancelled = rows[ids["cancelled"]]
    assert (cancelled["queue"], cancelled["reason"], cancelled["blocks_key"]) == (
        "beta",
        "cancelled",
        False,
    )
    assert cancelled["error"] == "cancelled by an operator: not needed"
    assert cancelled["failed_at"] >= cancelled["created_at"]


def test_blocked_keys_list_dead_and_retrying_heads_of_jobs_and_messages(dsn: str) -> None:
    ids = seed(dsn)
    rows = select(dsn, "SELECT * FROM pgqueue.blocked_keys ORDER BY kind, key")
    summary = [
        (r["kind"], r["queue"], r["key"], r["reason"], r["head_id"], r["head_task"],
         r["attempts"], r["error"], r["waiting"])
        for r in rows
    ]  # fmt: skip
    assert summary == [
        ("job", "alpha", "k-dead", "dead", ids["dead_head"], "charge", 1, "card declined", 2),
        ("job", "alpha", "k-retry", "retrying", ids["retry_head"], "sync", 1, "timeout", 1),
        ("outbox", None, "ok-dead", "dead", ids["dead_message"], "orders", 1, "HTTP 422", 1),
        (
            "outbox",
            None,
            "ok-retry",
            "retrying",
            ids["retry_message"],
            "payments",
            1,
            "HTTP 503",
            0,
        ),
    ]
    retrying = next(r for r in rows if r["key"] == "k-retry")
    dead = next(r for r in rows if r["key"] == "k-dead")
    with psycopg.connect(dsn) as conn:
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    assert retrying["since"] > now + timedelta(minutes=59), "retrying: when it runs again"
    assert dead["since"] <= now, "dead: when it died"


def test_outbox_backlog_counts_per_topic(dsn: str) -> None:
    seed(dsn)
    rows = by(select(dsn, "SELECT * FROM pgqueue.outbox_backlog"), "topic")
    orders, payments = rows["orders"], rows["payments"]
    assert [orders[c] for c in ("pending", "waiting", "in_flight", "dead")] == [2, 1, 1, 1]
    assert timedelta(minutes=3) <= orders["oldest_pending_age"] < timedelta(minutes=4)
    # The retrying message is pending but not due: it does not count as lag.
    assert [payments[c] for c in ("pending", "waiting", "in_flight", "dead")] == [1, 0, 0, 0]
    assert payments["oldest_pending_age"] == timedelta(0)


def test_workers_show_liveness(dsn: str) -> None:
    seed(dsn)
    rows = by(select(dsn, "SELECT * FROM pgqueue.workers"), "worker_id")
    assert {
        k: (r["kind"], r["host"], r["pid"], r["queues"], r["is_alive"]) for k, r in rows.items()
    } == {
        WORKER_STALE: ("worker", "host-a", 111, ["alpha"], False),
        WORKER_LIVE: ("worker", "host-b", 222, ["alpha", "beta"], True),
        RELAY: ("relay", "host-c", 333, ["webhook"], True),
    }
    assert timedelta(minutes=5) <= rows[WORKER_STALE]["since_heartbeat"] < timedelta(minutes=6)


def test_health_sees_relay_lag_long_transactions_and_live_workers(dsn: str) -> None:
    seed(dsn)
    (health,) = select(dsn, "SELECT * FROM pgqueue.health")
    assert health["live_workers"] == 2
    assert timedelta(minutes=3) <= health["relay_lag"] < timedelta(minutes=4)
    assert health["verdict"] == "warning"
    assert "oldest undelivered outbox message waits since 00:03" in health["reasons"]
    assert health["jobs_live_tuples"] is not None and health["jobs_dead_tuples"] is not None
    with psycopg.connect(dsn) as holder:
        # REPEATABLE READ keeps its snapshot (its xmin) between statements.
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM pgqueue.jobs")
        time.sleep(1.1)
        with psycopg.connect(dsn, autocommit=True) as writer:
            writer.execute("SELECT txid_current()")  # the horizon is older than this xid
        (health,) = select(dsn, "SELECT * FROM pgqueue.health")
        assert health["oldest_transaction_age"] >= timedelta(seconds=1)
        assert health["oldest_xmin_age"] is not None and health["oldest_xmin_age"] >= 1
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE pgqueue.outbox SET created_at = now() - interval '20 minutes'")
        (health,) = select(dsn, "SELECT * FROM pgqueue.health")
        assert health["verdict"] == "critical"
        conn.execute("DELETE FROM pgqueue.outbox")
        (health,) = select(dsn, "SELECT * FROM pgqueue.health")
        assert (health["verdict"], health["reasons"], health["relay_lag"]) == (
            "ok",
            "",
            timedelta(0),
        )


def test_health_sees_the_horizon_held_by_an_idle_writer(dsn: str) -> None:
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT txid_current()")  # wrote (has an xid), then went idle
        with psycopg.connect(dsn, autocommit=True) as writer:
            writer.execute("SELECT txid_current()")
        (health,) = select(dsn, "SELECT * FROM pgqueue.health")
        assert health["oldest_xmin_age"] is not None and health["oldest_xmin_age"] >= 1


# ---------------------------------------------------------------- plans on 1,000,000 jobs

# A narrow backlog in ten queues: 97% ready or scheduled, 1% running, 2% keyed (half of
# them waiting), retrying heads among the keyed ones; 20,000 dead letters.
FILL_JOBS = """
INSERT INTO pgqueue.queues (name) SELECT 'q' UNION ALL SELECT 'q' || i FROM generate_series(1, 9) i;
INSERT INTO pgqueue.jobs (queue, task, state, run_at, attempts, ordering_key, key_seq,
                          lease_token, lease_expires_at, worker_id, claimed_at, heartbeat_at)
SELECT CASE WHEN i % 10 = 0 THEN 'q' ELSE 'q' || (i % 10) END,
       't' || (i % 7),
       CASE WHEN i % 100 = 1 THEN 'running' WHEN i % 100 = 2 THEN 'waiting' ELSE 'available' END,
       now() - interval '1 hour' + (i % 7200) * interval '1 second',
       CASE WHEN i % 100 = 1 THEN 1 WHEN i % 1000 = 3 THEN 2 ELSE 0 END,
       CASE WHEN i % 100 IN (2, 3) THEN 'key' || (i % 5000) END,
       CASE WHEN i % 100 IN (2, 3) THEN i END,
       CASE WHEN i % 100 = 1 THEN gen_random_uuid() END,
       CASE WHEN i % 100 = 1 THEN now() + interval '30 seconds' END,
       CASE WHEN i % 100 = 1 THEN gen_random_uuid() END,
       CASE WHEN i % 100 = 1 THEN now() END,
       CASE WHEN i % 100 = 1 THEN now() END
FROM generate_series(1, 1000000) AS i;
INSERT INTO pgqueue.dead_jobs (id, queue, task, args, headers, priority, attempts, reason,
                               last_error, created_at, failed_at, ordering_key, blocks_key)
SELECT 2000000 + i, 'q' || (i % 10), 't' || (i % 7), '{}', '{}', 0, 20, 'max_attempts',
       'boom ' || i || E'\\ntraceback', now() - interval '2 days',
       now() - (i % 1000) * interval '1 minute',
       CASE WHEN i % 50 = 0 THEN 'key' || i END, i % 50 = 0
FROM generate_series(1, 20000) AS i;
"""

VIEW_QUERIES = {
    "queue_stats": "SELECT * FROM pgqueue.queue_stats",
    "running_jobs": "SELECT * FROM pgqueue.running_jobs",
    "dead_letters": "SELECT * FROM pgqueue.dead_letters ORDER BY failed_at DESC LIMIT 100",
    "blocked_keys": "SELECT * FROM pgqueue.blocked_keys",
}
# The claims a worker sends, from the start of the queue and from a hint (auto_explain
# shows the plans of the statements inside the function); CLAIM_INNER is used directly when
# auto_explain is missing.
CLAIM_CALLS = (
    "SELECT * FROM pgqueue.claim_jobs('q', 10, gen_random_uuid(), 30, '{}', '{}', 20,"
    " NULL, NULL, NULL, false)",
    "SELECT * FROM pgqueue.claim_jobs('q', 10, gen_random_uuid(), 30, '{}', '{}', 20,"
    " 0, date_part('epoch', now() - interval '1 hour'), 1, false)",
)
CLAIM_INNER = (
    "SELECT j.id FROM pgqueue.jobs AS j"
    " WHERE j.state = 'available' AND j.queue = 'q' AND j.run_at <= now()"
    " ORDER BY j.priority DESC, j.run_at, j.id LIMIT 10 FOR UPDATE SKIP LOCKED"
)


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


def scans(plan: dict[str, Any], relation: str = "jobs") -> list[str]:
    """'<node type> [index]' for every node that reads ``pgqueue.<relation>``."""
    found = []
    for node in plan_nodes(plan):
        if node.get("Relation Name") != relation or node["Node Type"] == "ModifyTable":
            continue
        indexes = [node["Index Name"]] if "Index Name" in node else []
        bitmaps = [c for c in node.get("Plans", []) if c.get("Parent Relationship") == "Outer"]
        indexes += [c["Index Name"] for b in bitmaps for c in plan_nodes(b) if "Index Name" in c]
        found.append(node["Node Type"] + (f" ({', '.join(indexes)})" if indexes else ""))
    return found


def explain(
    conn: psycopg.Connection[Any], query: str, runs: int = 1
) -> tuple[dict[str, Any], float, float]:
    """The plan, the first and the best execution time of ``runs`` (TIMING OFF: no per-row
    clock calls, which would otherwise double the time of the counting views). The first
    read after a bulk load also sets the rows' hint bits, so it is the slowest."""
    timings: list[float] = []
    plan: dict[str, Any] = {}
    for _ in range(runs):
        row = conn.execute(f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {query}").fetchone()
        assert row is not None
        document = row[0] if isinstance(row[0], list) else json.loads(row[0])
        plan = document[0]["Plan"]
        timings.append(document[0]["Execution Time"])
    return plan, timings[0], min(timings)


def claim_plan(conn: psycopg.Connection[Any]) -> tuple[list[str], str]:
    """The scans of pgqueue.jobs in the claim statement run inside claim_jobs."""
    notices: list[str] = []
    conn.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary or ""))
    try:
        conn.execute("LOAD 'auto_explain'")
    except psycopg.errors.UndefinedFile:
        conn.rollback()
        plan, _, ms = explain(conn, CLAIM_INNER)
        return scans(plan), f"{ms:.2f} ms (EXPLAIN of the inner statement)"
    found: list[str] = []
    timings: list[str] = []
    for call in CLAIM_CALLS:
        for setting, value in (
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_nested_statements", "on"),
            ("auto_explain.log_analyze", "on"),
            ("auto_explain.log_format", "json"),
            ("auto_explain.log_level", "notice"),
        ):
            conn.execute("SELECT set_config(%s, %s, true)", (setting, value))
        notices.clear()
        claimed = conn.execute(call).fetchall()
        conn.rollback()
        assert len(claimed) == 10, call
        plans = [
            json.loads(notice[notice.index("{") :])["Plan"]
            for notice in notices
            if "FOR UPDATE SKIP LOCKED" in notice
        ]
        assert plans, f"auto_explain showed no claim statement: {notices}"
        for plan in plans:
            found.extend(scans(plan))
            timings.append(f"{plan.get('Actual Total Time', 0.0):.2f}")
    return found, f"{' + '.join(timings)} ms (in claim_jobs, auto_explain)"


def check_plans(conn: psycopg.Connection[Any], label: str, runs: int) -> list[str]:
    report = []
    for view, query in VIEW_QUERIES.items():
        plan, first, ms = explain(conn, query, runs)
        relation = "dead_jobs" if view == "dead_letters" else "jobs"
        found = scans(plan, relation)
        assert found, f"{label}: {view} does not read pgqueue.{relation}?"
        assert not any(s.startswith("Seq Scan") for s in found), (
            f"{label}: {view} scans pgqueue.{relation} sequentially: {found}"
        )
        if view != "dead_letters":
            assert not any(s.startswith("Seq Scan") for s in scans(plan, "jobs"))
        timing = f"first {first:7.2f} ms, best of {runs} {ms:7.2f} ms"
        report.append(f"{label:>20} {view:<13} {timing}  {relation}: {'; '.join(found)}")
    found, timing = claim_plan(conn)
    assert found and not any(s.startswith("Seq Scan") for s in found), (
        f"{label}: the claim scans pgqueue.jobs sequentially: {found}"
    )
    report.append(f"{label:>20} {'claim':<13} {timing}  jobs: {'; '.join(found)}")
    return report


def assert_deep_counts(conn: psycopg.Connection[Any], is_analyzed: bool) -> None:
    """Past 2,000 a count is the planner's estimate: never below what was read, close to the
    truth once the table is analyzed; small counts and the lag stay exact."""
    exact = {
        (r[0], r[1]): r[2]
        for r in conn.execute(
            "SELECT queue, CASE WHEN state = 'available' AND run_at <= now() THEN 'ready' "
            "WHEN state = 'available' THEN 'scheduled' ELSE state END, count(*) "
            "FROM pgqueue.jobs GROUP BY 1, 2"
        )
    }
    dead_counts = dict(
        conn.execute("SELECT queue, count(*) FROM pgqueue.dead_jobs GROUP BY queue").fetchall()
    )
    oldest = dict(
        conn.execute(
            "SELECT queue, now() - min(run_at) FROM pgqueue.jobs "
            "WHERE state = 'available' AND run_at <= now() GROUP BY queue"
        ).fetchall()
    )
    rows = conn.execute(
        "SELECT queue, ready, scheduled, running, waiting, dead, lag, counts_estimated "
        "FROM pgqueue.queue_stats"
    ).fetchall()
    assert len(rows) == 10
    for queue, ready, scheduled, running, waiting, dead, lag, is_estimated in rows:
        assert lag == oldest[queue]
        shown = {"ready": ready, "scheduled": scheduled, "running": running, "waiting": waiting}
        truths = {name: exact.get((queue, name), 0) for name in shown}
        shown["dead"], truths["dead"] = dead, dead_counts.get(queue, 0)
        assert is_estimated == any(truth > 2000 for truth in truths.values())
        for name, truth in truths.items():
            if truth <= 2000 and not (name in ("ready", "scheduled") and is_estimated):
                assert shown[name] == truth, (queue, name)
            elif is_analyzed:
                assert abs(shown[name] - truth) <= truth * 0.25, (queue, name, shown, truth)
            elif name not in ("ready", "scheduled"):
                assert shown[name] >= 2001, (queue, name)
        assert ready + scheduled >= min(2001, truths["ready"] + truths["scheduled"])


def test_views_and_the_claim_use_indexes_on_a_million_jobs(dsn: str, capsys: Any) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Autovacuum would analyze the table in the middle of the first check.
        conn.execute("ALTER TABLE pgqueue.jobs SET (autovacuum_enabled = off)")
        started = time.monotonic()
        conn.execute(FILL_JOBS)
        fill_seconds = time.monotonic() - started
        assert conn.execute("SELECT count(*) FROM pgqueue.jobs").fetchone() == (1_000_000,)
    with psycopg.connect(dsn) as conn:
        # Three runs each: a dashboard polls these views, so their pages stay cached.
        report = check_plans(conn, "no statistics yet", runs=3)
        assert_deep_counts(conn, is_analyzed=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE pgqueue.jobs")
        conn.execute("VACUUM ANALYZE pgqueue.dead_jobs")
    with psycopg.connect(dsn) as conn:
        report += check_plans(conn, "after VACUUM ANALYZE", runs=3)
        assert_deep_counts(conn, is_analyzed=True)
        version = conn.execute("SHOW server_version").fetchone()
    with capsys.disabled():
        server = version[0] if version else "?"
        print(f"\nPostgreSQL {server}: 1,000,000 jobs inserted in {fill_seconds:.1f} s")
        print("\n".join(report))
