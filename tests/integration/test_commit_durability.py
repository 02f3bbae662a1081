"""Which of a worker's sessions wait for their commits to reach disk, on real PostgreSQL.

Claims commit asynchronously (a claim a server crash takes back is a job that runs again);
settles and cron ticks commit as the server, database or role is configured to. The
database here is configured to ``local``, a value no session would have by accident.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

import pgqueue
from pgqueue import db
from pgqueue.sinks.local import CallableSink
from pgqueue.store import JobStore, MessageStore


def configure_database(dsn: str, value: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        assert name is not None
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET synchronous_commit = {}").format(
                sql.Identifier(name[0]), sql.Literal(value)
            )
        )


async def setting(conn: psycopg.AsyncConnection[Any]) -> str:
    cursor = await conn.execute("SELECT current_setting('synchronous_commit')")
    row = await cursor.fetchone()
    assert row is not None
    return str(row[0])


async def test_claims_commit_asynchronously_and_settles_as_configured(dsn: str) -> None:
    configure_database(dsn, "local")
    for store in (JobStore(dsn, "pgqueue"), MessageStore(dsn, "pgqueue", keep_history=False)):
        try:
            assert await setting(await store._claimer.get()) == "off"
            assert await setting(await store._settler.get()) == "local"
        finally:
            await store.close()


async def test_durable_claims_keep_the_configured_setting(dsn: str) -> None:
    configure_database(dsn, "local")
    for store in (
        JobStore(dsn, "pgqueue", durable_claims=True),
        MessageStore(dsn, "pgqueue", keep_history=False, durable_claims=True),
    ):
        try:
            assert await setting(await store._claimer.get()) == "local"
        finally:
            await store.close()


def test_the_durable_claims_setting_reaches_the_stores(dsn: str) -> None:
    app = pgqueue.App()
    app.route("t.*", CallableSink("sink", lambda message: None))
    for durable in (False, True):
        worker = pgqueue.Worker(app, dsn, settings=pgqueue.WorkerSettings(durable_claims=durable))
        relay = pgqueue.Relay(app, dsn, settings=pgqueue.RelaySettings(durable_claims=durable))
        for store in (worker.store, relay.store):
            assert store._claimer._synchronous_commit == (None if durable else "off")


async def test_a_cron_tick_commits_as_configured_on_the_claiming_session(dsn: str) -> None:
    configure_database(dsn, "local")
    store = JobStore(dsn, "pgqueue")
    # The "enqueue" reports the setting its transaction runs with, as the job id.
    probe = db.Query(
        name="probe",
        text="SELECT CASE current_setting('synchronous_commit') WHEN 'local' THEN 7 ELSE -1 END"
        " AS job_id",
    )
    try:
        job_id = await store.cron_tick("probe", datetime(2026, 1, 1, tzinfo=UTC), probe, {})
        assert job_id == 7
        # The session itself goes on committing claims asynchronously.
        assert await setting(await store._claimer.get()) == "off"
    finally:
        await store.close()


def test_a_session_without_override_keeps_the_configured_setting(dsn: str) -> None:
    configure_database(dsn, "local")
    with db.connect(dsn, "test") as conn:
        row = conn.execute("SELECT current_setting('synchronous_commit')").fetchone()
        assert row == ("local",)
