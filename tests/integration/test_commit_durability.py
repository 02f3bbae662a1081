"""Which commits wait for their WAL to reach disk, on real PostgreSQL.

A claim of plain jobs in a queue without limits commits asynchronously (a claim a crash
takes back is a job that runs again); a claim of keyed jobs, a claim in a limited queue
and every claim with ``durable_claims`` commit as configured, and so does everything else.
The setting is made for the claim's transaction alone, never for a session (a session
setting would leak to other clients through PgBouncer's transaction pooling). The database
here is configured to ``local``, a value no session would have by accident.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
from psycopg import sql

import pgqueue
from pgqueue import db
from pgqueue.claims import hint_params
from pgqueue.store import JobStore, MessageStore

CLAIM = db.queries("pgqueue")["claim_jobs"].text


def configure_database(dsn: str, value: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        assert name is not None
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET synchronous_commit = {}").format(
                sql.Identifier(name[0]), sql.Literal(value)
            )
        )


def claim_commit_mode(
    dsn: str, queue: str, *, durable: bool = False, hint: dict[str, Any] | None = None
) -> tuple[int, str]:
    """Claim from ``queue`` in a transaction; how many jobs, and the setting the commit
    would use. Rolled back: the jobs stay available."""
    with psycopg.connect(dsn) as conn:
        claimed = conn.execute(
            CLAIM,
            {
                "queue": queue,
                "limit": 10,
                "worker_id": uuid.uuid4(),
                "lease_seconds": 30.0,
                "task_names": ["t"],
                "task_max_attempts": [3],
                "default_max_attempts": 3,
                **(hint or hint_params(None)),
                "durable": durable,
            },
        ).fetchall()
        setting = conn.execute("SELECT current_setting('synchronous_commit')").fetchone()
        conn.rollback()
    assert setting is not None
    return len(claimed), str(setting[0])


def enqueue(dsn: str, queue: str, count: int, **options: Any) -> None:
    with psycopg.connect(dsn) as conn:
        for n in range(count):
            pgqueue.enqueue(conn, "t", {"n": n}, queue=queue, **options)
        conn.commit()


def test_a_claim_of_plain_jobs_does_not_wait_for_the_flush(dsn: str) -> None:
    configure_database(dsn, "local")
    enqueue(dsn, "plain", 3)
    assert claim_commit_mode(dsn, "plain") == (3, "off")


def test_durable_claims_wait_as_configured(dsn: str) -> None:
    configure_database(dsn, "local")
    enqueue(dsn, "plain", 3)
    assert claim_commit_mode(dsn, "plain", durable=True) == (3, "local")


def test_a_claim_with_a_keyed_job_waits_as_configured(dsn: str) -> None:
    configure_database(dsn, "local")
    enqueue(dsn, "mixed", 2)
    enqueue(dsn, "mixed", 1, ordering_key="k")
    assert claim_commit_mode(dsn, "mixed") == (3, "local")


def test_a_keyed_job_found_by_the_second_pass_of_a_hinted_claim_still_waits(dsn: str) -> None:
    # The hinted pass leases the plain job above the hint and comes up short; the pass from
    # the start then leases the keyed one behind it: the commit must wait after all.
    configure_database(dsn, "local")
    enqueue(dsn, "hinted", 1, ordering_key="k")
    enqueue(dsn, "hinted", 1, priority=1)
    past_everything = {"hint_priority": 0, "hint_epoch": 4102444800.0, "hint_id": 2**62}
    assert claim_commit_mode(dsn, "hinted", hint=past_everything) == (2, "local")


def test_a_claim_in_a_limited_queue_waits_as_configured(dsn: str) -> None:
    configure_database(dsn, "local")
    with psycopg.connect(dsn) as conn:
        pgqueue.configure_queue(conn, "capped", concurrency_limit=100)
        pgqueue.configure_queue(conn, "paced", rate_limit=(1000, 1.0))
        conn.commit()
    enqueue(dsn, "capped", 2)
    enqueue(dsn, "paced", 2)
    assert claim_commit_mode(dsn, "capped") == (2, "local")
    assert claim_commit_mode(dsn, "paced") == (2, "local")


def test_no_session_of_a_worker_or_relay_changes_the_setting(dsn: str) -> None:
    configure_database(dsn, "local")

    async def sessions() -> list[str]:
        found = []
        for store in (JobStore(dsn, "pgqueue"), MessageStore(dsn, "pgqueue", keep_history=False)):
            try:
                for session in (store._claimer, store._settler):
                    cursor = await (await session.get()).execute(
                        "SELECT current_setting('synchronous_commit')"
                    )
                    row = await cursor.fetchone()
                    assert row is not None
                    found.append(str(row[0]))
            finally:
                await store.close()
        return found

    assert asyncio.run(sessions()) == ["local"] * 4


def test_the_durable_claims_setting_reaches_the_store(dsn: str) -> None:
    app = pgqueue.App()

    @app.task(queue="q")
    def t(job: pgqueue.Job) -> None: ...

    for durable in (False, True):
        worker = pgqueue.Worker(app, dsn, settings=pgqueue.WorkerSettings(durable_claims=durable))
        assert worker.store._durable_claims is durable
