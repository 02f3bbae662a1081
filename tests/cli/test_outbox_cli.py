"""`pgqueue outbox status|requeue` and `pgqueue relay` start-up, as users run them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import pgqueue
from tests.apps.outbox_app import LEDGER_DDL
from tests.integration.test_outbox import query, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
RELAY_APP = "tests.apps.outbox_app:app"


def pgqueue_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PGQUEUE_DSN", "DATABASE_URL") and not k.startswith("OUTBOX_TEST_")
    }
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pgqueue.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=REPO_ROOT,
    )


def relay_args(dsn: str) -> list[str]:
    return [
        "relay",
        "--app",
        RELAY_APP,
        "--dsn",
        dsn,
        "--lease-seconds",
        "2",
        "--poll-seconds",
        "0.2",
    ]


def claim_and_fail(dsn: str, count: int, *, reason: str = "rejected") -> None:
    """Claim ``count`` messages as a relay would, and dead-letter them."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT id, lease_token FROM pgqueue.claim_messages(%s, %s, 60)",
            [count, uuid.uuid4()],
        ).fetchall()
        assert len(rows) == count
        conn.execute(
            "SELECT pgqueue.fail_messages(%s, %s, %s, %s, %s)",
            [
                [r["id"] for r in rows],
                [r["lease_token"] for r in rows],
                [reason] * count,
                ["HTTP 400"] * count,
                [True] * count,
            ],
        )


def outbox_state(dsn: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return (
        query(dsn, "SELECT * FROM pgqueue.outbox ORDER BY id"),
        query(dsn, "SELECT * FROM pgqueue.outbox_dead ORDER BY id"),
    )


@pytest.fixture
def backlog(dsn: str) -> str:
    """audit.x: 1 dead. billing.sent: 1 in flight, 1 dead. orders.created: 4 pending (one of
    them delayed, one created 100 s ago), 2 waiting behind key a."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgqueue.publish(conn, "audit.x", {"n": 0})
        claim_and_fail(dsn, 1)
        pgqueue.publish(conn, "billing.sent", {"n": 1})
        pgqueue.publish(conn, "billing.sent", {"n": 2})
        with psycopg.connect(dsn, autocommit=True) as relay:
            relay.execute("SELECT pgqueue.claim_messages(1, %s, 60)", [uuid.uuid4()])
        claim_and_fail(dsn, 1)
        old = pgqueue.publish(conn, "orders.created", {"n": 3})
        pgqueue.publish(conn, "orders.created", {"n": 4})
        for n in range(3):
            pgqueue.publish(conn, "orders.created", {"n": 5 + n}, key="a")
        later = pgqueue.publish(conn, "orders.created", {"n": 8}, delay=3600)
        conn.execute(
            "UPDATE pgqueue.outbox SET created_at = now() - interval '100 seconds'"
            " WHERE message_id = %s",
            [old],
        )
        conn.execute(
            "UPDATE pgqueue.outbox SET created_at = now() - interval '1000 seconds'"
            " WHERE message_id = %s",
            [later],
        )
    return dsn


# ------------------------------------------------------------------ status


def test_status_json_counts_every_state_per_topic(backlog: str) -> None:
    result = pgqueue_cli("outbox", "status", "--json", "--dsn", backlog)
    assert result.returncode == 0, result.stderr
    rows = {row.pop("topic"): row for row in json.loads(result.stdout)}
    orders_age = rows["orders.created"].pop("oldest_pending_seconds")
    assert rows == {
        "audit.x": {
            "pending": 0,
            "waiting": 0,
            "in_flight": 0,
            "dead": 1,
            "oldest_pending_seconds": 0,
        },
        "billing.sent": {
            "pending": 0,
            "waiting": 0,
            "in_flight": 1,
            "dead": 1,
            "oldest_pending_seconds": 0,
        },
        "orders.created": {"pending": 4, "waiting": 2, "in_flight": 0, "dead": 0},
    }
    # The oldest due message counts; the delayed one (older still, but not due) does not.
    assert 100 <= orders_age < 160


def test_status_table_and_empty_outbox(dsn: str, backlog: str) -> None:
    table = pgqueue_cli("outbox", "status", "--dsn", backlog)
    assert table.returncode == 0, table.stderr
    for word in ("orders.created", "billing.sent", "audit.x", "pending", "waiting", "dead"):
        assert word in table.stdout
    query(dsn, "TRUNCATE pgqueue.outbox, pgqueue.outbox_dead")
    empty = pgqueue_cli("outbox", "status", "--dsn", dsn)
    assert empty.returncode == 0 and "the outbox is empty" in empty.stdout
    assert json.loads(pgqueue_cli("outbox", "status", "--json", "--dsn", dsn).stdout) == []


# ------------------------------------------------------------------ requeue


def test_requeue_dry_run_changes_nothing(backlog: str) -> None:
    before = outbox_state(backlog)
    result = pgqueue_cli("outbox", "requeue", "--all", "--dry-run", "--dsn", backlog)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "would requeue 2 dead message(s)"
    as_json = pgqueue_cli("outbox", "requeue", "--all", "--dry-run", "--json", "--dsn", backlog)
    assert json.loads(as_json.stdout) == {"requeued": 2, "dry_run": True}
    assert outbox_state(backlog) == before


def test_requeue_by_topic_and_by_id_keeps_the_message_id(backlog: str) -> None:
    dead = {r["topic"]: r for r in outbox_state(backlog)[1]}
    result = pgqueue_cli("outbox", "requeue", "--topic", "audit.x", "--json", "--dsn", backlog)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"requeued": 1, "dry_run": False}
    [back] = query(backlog, "SELECT * FROM pgqueue.outbox WHERE topic = 'audit.x'")
    assert back["message_id"] == dead["audit.x"]["message_id"]
    assert (back["state"], back["attempts"], back["id"]) == ("pending", 0, dead["audit.x"]["id"])

    unknown = pgqueue_cli("outbox", "requeue", "--id", "999999", "--dsn", backlog)
    assert unknown.returncode == 0 and "requeued 0 dead message(s)" in unknown.stdout
    by_id = pgqueue_cli(
        "outbox", "requeue", "--id", str(dead["billing.sent"]["id"]), "--dsn", backlog
    )
    assert by_id.returncode == 0 and "requeued 1 dead message(s)" in by_id.stdout
    assert outbox_state(backlog)[1] == []


def test_requeue_needs_a_selection_and_a_valid_topic(backlog: str) -> None:
    before = outbox_state(backlog)
    nothing = pgqueue_cli("outbox", "requeue", "--dsn", backlog)
    assert nothing.returncode == 2
    assert "choose what to requeue" in nothing.stderr
    bad = pgqueue_cli("outbox", "requeue", "--topic", "no such topic", "--dsn", backlog)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "invalid topic name" in bad.stderr
    assert outbox_state(backlog) == before


# ------------------------------------------------------------------ relay start-up


@pytest.mark.faults
def test_relay_refuses_to_start_with_pending_messages_no_route_matches(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        pgqueue.publish(conn, "ledger.ok", {"n": 1})
        pgqueue.publish(conn, "billing.created", {"n": 2}, key="b")
    result = pgqueue_cli(*relay_args(dsn), env={"PGQUEUE_DSN": dsn}, timeout=30)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line or "error" in line]
    assert len(errors) == 1, result.stderr
    assert "billing.created" in errors[0] and "ledger.ok" not in errors[0]
    assert "Traceback" not in result.stderr
    # Nothing was delivered, nothing dropped.
    assert [r["topic"] for r in query(dsn, "SELECT topic FROM pgqueue.outbox ORDER BY id")] == [
        "ledger.ok",
        "billing.created",
    ]
    assert query(dsn, "SELECT 1 FROM pgqueue.outbox_dead") == []


@pytest.mark.faults
def test_relay_with_a_default_route_delivers_any_topic(dsn: str, tmp_path: Path) -> None:
    query(dsn, LEDGER_DDL)
    with psycopg.connect(dsn) as conn:
        message_id = pgqueue.publish(conn, "billing.created", {"n": 2}, key="b")
    environment = {
        **{k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        "PGQUEUE_DSN": dsn,
        "OUTBOX_TEST_DEFAULT_ROUTE": "1",
    }
    with open(tmp_path / "relay.log", "wb") as log:
        relay = subprocess.Popen(
            [sys.executable, "-m", "pgqueue.cli.main", *relay_args(dsn)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=environment,
            cwd=REPO_ROOT,
        )
        try:
            rows = wait_until(
                lambda: (
                    query(dsn, "SELECT message_id::text, topic, key FROM outbox_ledger")
                    or relay.poll() is not None
                ),
                20,
                "the message in the ledger",
            )
            relay.send_signal(signal.SIGTERM)
            code = relay.wait(15)
        finally:
            if relay.poll() is None:
                relay.kill()
                relay.wait(10)
    output = (tmp_path / "relay.log").read_text()
    assert rows == [{"message_id": message_id, "topic": "billing.created", "key": "b"}], output
    assert code == 0, output


@pytest.mark.faults
def test_relay_with_a_webhook_url_that_does_not_parse_fails_at_start(dsn: str) -> None:
    result = pgqueue_cli(
        *relay_args(dsn),
        env={"PGQUEUE_DSN": dsn, "OUTBOX_TEST_HTTP_URL": "http://hooks.internal:80a/x"},
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: sink 'webhook': url does not parse")


@pytest.mark.faults
def test_relay_for_an_app_without_routes_says_so(dsn: str) -> None:
    result = pgqueue_cli("relay", "--app", "tests.apps.fault_app:app", "--dsn", dsn, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "the app has no outbox routes" in result.stderr


def test_a_requeue_racing_a_publish_of_the_same_key_leaves_one_live_message(dsn: str) -> None:
    # Key k: a dead message that does not block it, nothing live. A publish of k is under
    # way (uncommitted) while the operator requeues the dead one: the requeue waits for the
    # key, sees the new head, and rejoins the line behind it (one live message per key).
    relay_id = uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgqueue.publish(conn, "t.x", {"n": 0}, key="k")
        [(head, token)] = conn.execute(
            "SELECT id, lease_token FROM pgqueue.claim_messages(10, %s, 30)", [relay_id]
        ).fetchall()
        conn.execute(
            "SELECT pgqueue.fail_messages(%s::bigint[], %s::uuid[], %s::text[], %s::text[],"
            " %s::boolean[])",
            [[head], [token], ["rejected"], ["no"], [False]],
        )
    publisher = psycopg.connect(dsn)
    try:
        pgqueue.publish(publisher, "t.x", {"n": 1}, key="k")  # open transaction
        requeue = subprocess.Popen(
            [sys.executable, "-m", "pgqueue.cli.main", "outbox", "requeue", "--all", "--dsn", dsn],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # The requeue waits on the key's lock held by the publisher.
        wait_until(
            lambda: query(
                dsn,
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%%ordering_keys%%'",
            ),
            20,
            "the requeue to wait for the key",
        )
        publisher.commit()
        _, err = requeue.communicate(timeout=30)
        assert requeue.returncode == 0, err
    finally:
        publisher.close()
    states = {
        r["n"]: r["state"]
        for r in query(
            dsn, "SELECT (payload->>'n')::int AS n, state FROM pgqueue.outbox WHERE key = 'k'"
        )
    }
    assert states == {0: "waiting", 1: "pending"}, states
