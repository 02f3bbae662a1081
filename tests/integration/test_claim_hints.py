"""Hinted claims against real PostgreSQL: where a claim starts, and what it must still find.

A worker passes the position where its last full batch ended (pgqueue/claims.py); the
claim looks at higher priorities and at what lies past that position, and scans from the
start when that comes up short.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgqueue
from pgqueue import db
from pgqueue.claims import ClaimHint, ClaimHints, hint_params
from tests.integration.worker_runner import running_worker, wait_until

CLAIM = db.queries("pgqueue")["claim_jobs"].text
ACK = db.queries("pgqueue")["complete_jobs"].text
RELEASE = db.queries("pgqueue")["release_jobs"].text


def claim(
    conn: psycopg.Connection[Any], limit: int, hint: ClaimHint | None
) -> list[tuple[Any, ...]]:
    params = {
        "queue": "q",
        "limit": limit,
        "worker_id": uuid.uuid4(),
        "lease_seconds": 30.0,
        "task_names": ["t"],
        "task_max_attempts": [3],
        "default_max_attempts": 3,
        **hint_params(hint),
        "durable": False,
    }
    return conn.execute(CLAIM, params).fetchall()  # type: ignore[arg-type]


def ack(conn: psycopg.Connection[Any], rows: list[tuple[Any, ...]]) -> None:
    done = conn.execute(ACK, {"ids": [r[0] for r in rows], "tokens": [r[9] for r in rows]})
    assert len(done.fetchall()) == len(rows)


def ids(rows: list[tuple[Any, ...]]) -> set[int]:
    return {row[0] for row in rows}


def test_a_hinted_claim_takes_higher_priorities_and_what_follows_the_hint(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        first = [pgqueue.enqueue(conn, "t", {"n": n}, queue="q") for n in range(10)]
        taken = claim(conn, 5, None)
        assert ids(taken) == set(first[:5])
        hints = ClaimHints(60.0)
        hints.record("q", taken, 5, None)
        hint = hints.get("q")
        assert hint is not None and hint.id == first[4]

        # Ready behind the hint: due earlier than every job claimed so far.
        behind = pgqueue.enqueue(
            conn, "t", {}, queue="q", run_at=datetime.now(UTC) - timedelta(hours=1)
        )
        urgent = pgqueue.enqueue(conn, "t", {}, queue="q", priority=5)

        # A full hinted claim: the urgent job and the next four; the one behind waits.
        full = claim(conn, 5, hint)
        assert ids(full) == {urgent, *first[5:9]}
        hints.record("q", full, 5, hint)
        hint = hints.get("q")
        assert hint is not None and hint.id == first[8]

        # Past the hint only one job is left, so the claim scans from the start as well.
        short = claim(conn, 5, hint)
        assert ids(short) == {first[9], behind}
        assert claim(conn, 5, None) == []


def test_a_job_behind_the_hint_is_found_by_the_next_unhinted_claim(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        first = [pgqueue.enqueue(conn, "t", {}, queue="q") for _ in range(6)]
        taken = claim(conn, 2, None)
        # Given back as a shutdown does: it keeps its place, now behind the hint.
        given_back = [row for row in taken if row[0] == first[0]]
        released = conn.execute(
            RELEASE,  # type: ignore[arg-type]
            {"ids": [given_back[0][0]], "tokens": [given_back[0][9]]},
        ).fetchall()
        assert released == [(first[0],)]
        clock = [0.0]
        hints = ClaimHints(1.0, clock=lambda: clock[0])
        assert hints.get("q") is None
        hints.record("q", taken, 2, None)
        hint = hints.get("q")
        assert hint is not None
        assert ids(claim(conn, 2, hint)) == set(first[2:4])
        clock[0] = 1.5
        assert hints.get("q") is None
        assert ids(claim(conn, 2, None)) == {first[0], first[4]}


def _index_blocks(conn: psycopg.Connection[Any], hint: ClaimHint | None) -> int:
    """Index pages read by the claim's scans of jobs_claim_idx (auto_explain, rolled back)."""
    notices: list[str] = []
    conn.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary or ""))
    try:
        conn.execute("LOAD 'auto_explain'")
    except psycopg.errors.UndefinedFile:
        pytest.skip("this server has no auto_explain (a contrib module) to show the plans")
    with conn.transaction(force_rollback=True):
        for setting, value in (
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_nested_statements", "on"),
            ("auto_explain.log_analyze", "on"),
            ("auto_explain.log_buffers", "on"),
            ("auto_explain.log_format", "json"),
            ("auto_explain.log_level", "notice"),
        ):
            conn.execute("SELECT set_config(%s, %s, true)", (setting, value))
        assert len(claim(conn, 1000, hint)) == 1000
    blocks = 0
    for notice in notices:
        if "FOR UPDATE SKIP LOCKED" not in notice:
            continue
        document = json.loads(notice[notice.index("{") :])
        stack = [document["Plan"]]
        while stack:
            node = stack.pop()
            stack.extend(node.get("Plans", []))
            if node.get("Index Name") == "jobs_claim_idx":
                blocks += node["Shared Hit Blocks"] + node["Shared Read Blocks"]
    assert notices, "auto_explain showed nothing"
    return blocks


def test_a_hinted_claim_does_not_step_over_what_the_drain_left_behind(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The entries must stay until the measurement: no autovacuum of this table.
        conn.execute("ALTER TABLE pgqueue.jobs SET (autovacuum_enabled = off)")
        with conn.transaction():
            pgqueue.enqueue_many(conn, [("t", {"n": n}) for n in range(40_000)], queue="q")
        hints = ClaimHints(3600.0)
        for _ in range(30):
            hint = hints.get("q")
            rows = claim(conn, 1000, hint)
            hints.record("q", rows, 1000, hint)
            ack(conn, rows)
        hint = hints.get("q")
        assert hint is not None
        # The 30,000 claimed jobs left their entries in the claim index (no vacuum ran):
        # a claim from the start of the queue reads past them, a hinted one does not.
        from_start = _index_blocks(conn, None)
        hinted = _index_blocks(conn, hint)
        assert from_start > 100
        assert hinted * 5 < from_start, (hinted, from_start)


def test_an_ordering_key_moves_on_at_once_behind_a_backlog_of_full_claims(dsn: str) -> None:
    # The key's later jobs are enqueued first, so each one, promoted when the one before it
    # is settled, keeps a place ahead of the backlog: behind the worker's hint while its
    # claims come back full. Settling a keyed job makes the next claim scan from the start;
    # without that, the key would move on once per full scan (a second) and finish last.
    app = pgqueue.App()
    finished: list[str] = []

    @app.task(queue="q")
    async def work(job: pgqueue.Job, kind: str, n: int) -> None:
        await asyncio.sleep(0.005)
        finished.append(f"{kind}{n}")

    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        chain = [
            pgqueue.JobSpec("work", {"kind": "key", "n": n}, ordering_key="k") for n in range(8)
        ]
        backlog = [("work", {"kind": "bulk", "n": n}) for n in range(4000)]
        pgqueue.enqueue_many(conn, chain, queue="q")
        pgqueue.enqueue_many(conn, backlog, queue="q")
    with running_worker(app, dsn, queues=["q"], concurrency=20, batch_size=20, poll_seconds=1.0):
        wait_until(lambda: len(finished) >= 4008, timeout=120)
    keys = [name for name in finished if name.startswith("key")]
    assert keys == [f"key{n}" for n in range(8)]
    last_key = finished.index("key7")
    assert last_key < 2000, f"the key's last job finished {last_key}th of 4,008"
