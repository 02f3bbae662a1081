"""Enqueue on every supported connection type, inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import pgqueue
from pgqueue.errors import PayloadTooLarge

Enqueuer = Callable[[str, bool], Awaitable[None]]


def _sa_url(dsn: str) -> str:
    return "postgresql+psycopg://" + dsn.split("://", 1)[1]


async def _psycopg_sync(dsn: str, commit: bool) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO orders VALUES (1)")
        pgqueue.enqueue(conn, "send_receipt", {"order_id": 1}, queue="email")
        pgqueue.enqueue_many(conn, [("send_receipt", {"order_id": 2})], queue="email")
        conn.commit() if commit else conn.rollback()


async def _psycopg_async(dsn: str, commit: bool) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("INSERT INTO orders VALUES (1)")
        await pgqueue.enqueue_async(conn, "send_receipt", {"order_id": 1}, queue="email")
        await pgqueue.enqueue_many_async(conn, [("send_receipt", {"order_id": 2})], queue="email")
        await (conn.commit() if commit else conn.rollback())


async def _sa_connection(dsn: str, commit: bool) -> None:
    engine = create_engine(_sa_url(dsn))
    with engine.connect() as conn:
        conn.execute(text("INSERT INTO orders VALUES (1)"))
        pgqueue.enqueue(conn, "send_receipt", {"order_id": 1}, queue="email")
        pgqueue.enqueue_many(conn, [("send_receipt", {"order_id": 2})], queue="email")
        conn.commit() if commit else conn.rollback()
    engine.dispose()


async def _sa_session(dsn: str, commit: bool) -> None:
    engine = create_engine(_sa_url(dsn))
    with Session(engine) as session:
        session.execute(text("INSERT INTO orders VALUES (1)"))
        pgqueue.enqueue(session, "send_receipt", {"order_id": 1}, queue="email")
        pgqueue.enqueue_many(session, [("send_receipt", {"order_id": 2})], queue="email")
        session.commit() if commit else session.rollback()
    engine.dispose()


async def _sa_async_connection(dsn: str, commit: bool) -> None:
    engine = create_async_engine(_sa_url(dsn))
    async with engine.connect() as conn:
        await conn.execute(text("INSERT INTO orders VALUES (1)"))
        await pgqueue.enqueue_async(conn, "send_receipt", {"order_id": 1}, queue="email")
        await pgqueue.enqueue_many_async(conn, [("send_receipt", {"order_id": 2})], queue="email")
        await (conn.commit() if commit else conn.rollback())
    await engine.dispose()


async def _sa_async_session(dsn: str, commit: bool) -> None:
    engine = create_async_engine(_sa_url(dsn))
    async with AsyncSession(engine) as session:
        await session.execute(text("INSERT INTO orders VALUES (1)"))
        await pgqueue.enqueue_async(session, "send_receipt", {"order_id": 1}, queue="email")
        await pgqueue.enqueue_many_async(
            session, [("send_receipt", {"order_id": 2})], queue="email"
        )
        await (session.commit() if commit else session.rollback())
    await engine.dispose()


KINDS = [
    pytest.param(_psycopg_sync, id="psycopg"),
    pytest.param(_psycopg_async, id="psycopg-async"),
    pytest.param(_sa_connection, id="sqlalchemy-connection"),
    pytest.param(_sa_session, id="sqlalchemy-session"),
    pytest.param(_sa_async_connection, id="sqlalchemy-async-connection"),
    pytest.param(_sa_async_session, id="sqlalchemy-async-session"),
]


def _counts(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        orders = conn.execute("SELECT count(*) FROM orders").fetchone()
        jobs = conn.execute("SELECT count(*) FROM pgqueue.jobs").fetchone()
    assert orders is not None and jobs is not None
    return orders[0], jobs[0]


@pytest.fixture
def shop_dsn(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    return dsn


@pytest.mark.parametrize("enqueue_in", KINDS)
async def test_rollback_leaves_no_job_and_commit_keeps_both(
    shop_dsn: str, enqueue_in: Callable[[str, bool], Awaitable[None]]
) -> None:
    await enqueue_in(shop_dsn, False)
    assert _counts(shop_dsn) == (0, 0)
    await enqueue_in(shop_dsn, True)
    assert _counts(shop_dsn) == (1, 2)


def test_options_are_stored_and_delay_uses_the_database_clock(
    conn: psycopg.Connection[Any],
) -> None:
    job_id = pgqueue.enqueue(
        conn,
        "report",
        {"day": "2026-11-25"},
        queue="reports",
        priority=5,
        delay=timedelta(seconds=90),
        max_attempts=4,
        timeout=12.5,
        headers={"trace": "abc"},
    )
    row = conn.execute(
        "SELECT queue, priority, extract(epoch FROM run_at - now()), max_attempts, "
        "timeout_seconds, headers, args, state FROM pgqueue.jobs WHERE id = %s",
        (job_id,),
    ).fetchone()
    assert row is not None
    queue, priority, delay, max_attempts, timeout, headers, args, state = row
    assert (queue, priority, max_attempts, timeout, state) == ("reports", 5, 4, 12.5, "available")
    # Same transaction, so now() is the insert's now(): the delay is exact.
    assert float(delay) == pytest.approx(90, abs=0.001)
    assert headers == {"trace": "abc"} and args == {"day": "2026-11-25"}


def test_run_at_must_be_aware_and_exclusive_with_delay(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        pgqueue.enqueue(conn, "t", run_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="not both"):
        pgqueue.enqueue(conn, "t", run_at=datetime.now(timezone.utc), delay=5)


def test_enqueue_many_of_100k_jobs_is_a_copy_and_three_statements(dsn: str) -> None:
    executed: list[str] = []

    class CountingCursor(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            executed.append(str(query)[:40])
            return super().execute(query, params, **kwargs)

    with psycopg.connect(dsn, cursor_factory=CountingCursor) as conn:
        ids = pgqueue.enqueue_many(conn, (("bulk", {"n": n}) for n in range(100_000)), queue="bulk")
        conn.commit()
        # A savepoint around one preparing call and the COPY, whatever the number of jobs.
        assert len(executed) == 3 and executed[1].startswith("SELECT status, db_now, ids")
        assert len(ids) == 100_000 and ids == sorted(ids)
        first = conn.execute("SELECT args FROM pgqueue.jobs WHERE id = %s", (ids[0],)).fetchone()
        last = conn.execute("SELECT args FROM pgqueue.jobs WHERE id = %s", (ids[-1],)).fetchone()
    assert first == ({"n": 0},) and last == ({"n": 99_999},)


def test_bad_input_fails_before_sql_and_keeps_the_transaction_usable(
    conn: psycopg.Connection[Any],
) -> None:
    kept = pgqueue.enqueue(conn, "ok", {"n": 1})
    with pytest.raises(ValueError, match=r"invalid queue name 'bad queue'.*letters, digits"):
        pgqueue.enqueue(conn, "ok", {}, queue="bad queue")
    with pytest.raises(ValueError, match="invalid task name"):
        pgqueue.enqueue(conn, "rm -rf", {})
    with pytest.raises(TypeError, match=r"args\['when'\] is a set"):
        pgqueue.enqueue(conn, "ok", {"when": {1, 2}})
    with pytest.raises(PayloadTooLarge):
        pgqueue.enqueue(conn, "ok", {"blob": "x" * (300 * 1024)})
    with pytest.raises(TypeError, match=r"jobs\[1\]"):
        pgqueue.enqueue_many(conn, [("ok", {}), ("ok", {"x": object()})])
    conn.commit()
    row = conn.execute("SELECT array_agg(id) FROM pgqueue.jobs").fetchone()
    assert row == ([kept],)


def test_wrong_connection_types_say_what_to_use(dsn: str) -> None:
    with pytest.raises(TypeError, match="psycopg Connection or a SQLAlchemy"):
        pgqueue.enqueue(object(), "t", {})


async def test_async_twin_rejects_a_sync_connection(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(TypeError, match="without _async"):
        await pgqueue.enqueue_async(conn, "t", {})


def test_a_ready_job_notifies_its_queue_once_per_transaction(dsn: str) -> None:
    from pgqueue.db import channel

    with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn) as producer:
        listener.execute(f'LISTEN "{channel("pgqueue", "email")}"')
        listener.execute(f'LISTEN "{channel("pgqueue", "later")}"')
        for n in range(5):
            pgqueue.enqueue(producer, "t", {"n": n}, queue="email")
        pgqueue.enqueue_many(producer, [("t", {})] * 3, queue="email")
        pgqueue.enqueue(producer, "t", {}, queue="later", delay=60)
        producer.commit()
        received = list(listener.notifies(timeout=1.0))
    assert [n.channel for n in received] == [channel("pgqueue", "email")]
    assert received[0].payload == ""


def test_task_shortcut_uses_task_defaults(conn: psycopg.Connection[Any]) -> None:
    app = pgqueue.App()

    @app.task(queue="email", max_attempts=7, timeout=30)
    def send_receipt(job: pgqueue.Job, order_id: int, copy: bool = False) -> None: ...

    job_id = send_receipt.enqueue(conn, 42, copy=True)
    later = send_receipt.options(delay=60, priority=3).enqueue(conn, order_id=43)
    rows = conn.execute(
        "SELECT id, queue, task, args, max_attempts, timeout_seconds, priority, run_at > now() "
        "FROM pgqueue.jobs ORDER BY id"
    ).fetchall()
    assert rows == [
        (job_id, "email", "send_receipt", {"order_id": 42, "copy": True}, 7, 30.0, 0, False),
        (later, "email", "send_receipt", {"order_id": 43}, 7, 30.0, 3, True),
    ]
    with pytest.raises(TypeError, match="do not fit its handler"):
        send_receipt.enqueue(conn, 1, 2, 3)


def test_bulk_copy_round_trips_awkward_text_and_options(dsn: str) -> None:
    awkward = {"s": 'back\\slash "quote" tab\t newline\n é ☃ \\N', "n": [1.5, None, True]}
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    jobs = [pgqueue.JobSpec("t", {**awkward, "i": i}) for i in range(1500)]
    jobs.append(
        pgqueue.JobSpec("t", {"i": -1}, run_at=later, max_attempts=3, timeout=2.5, priority=7)
    )
    with psycopg.connect(dsn) as conn:
        ids = pgqueue.enqueue_many(conn, jobs, queue="bulk", headers={"h": "v\\w"}, delay=30)
        conn.commit()
        rows = conn.execute(
            "SELECT id, args, headers, priority, max_attempts, timeout_seconds, "
            "extract(epoch FROM run_at - created_at) FROM pgqueue.jobs ORDER BY id"
        ).fetchall()
    assert [row[0] for row in rows] == ids
    assert rows[0][1] == {**awkward, "i": 0} and rows[0][2] == {"h": "v\\w"}
    assert float(rows[0][6]) == pytest.approx(30, abs=0.01)
    last = rows[-1]
    assert last[1] == {"i": -1} and last[3:6] == (7, 3, 2.5)


def test_bulk_copy_of_default_jobs_sends_four_columns_and_keeps_every_default(dsn: str) -> None:
    awkward = {"s": 'back\\slash "quote" tab\t newline\n é ☃ \\N'}
    with psycopg.connect(dsn) as conn:
        ids = pgqueue.enqueue_many(conn, [("t", {**awkward, "i": i}) for i in range(1200)])
        now = conn.execute("SELECT now()").fetchone()
        conn.commit()
        rows = conn.execute(
            "SELECT id, queue, args, headers, priority, run_at, max_attempts, timeout_seconds, "
            "state, attempts FROM pgqueue.jobs ORDER BY id"
        ).fetchall()
    assert [row[0] for row in rows] == ids and len(ids) == 1200
    assert rows[7][1:] == (
        "default",
        {**awkward, "i": 7},
        {},
        0,
        now[0],
        None,
        None,
        "available",
        0,
    )
    assert {row[5] for row in rows} == {now[0]}


async def test_bulk_copy_async_and_queue_full_keeps_the_transaction(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        ids = await pgqueue.enqueue_many_async(conn, [("t", {"i": i}) for i in range(1200)])
        await conn.commit()
        assert len(ids) == 1200
        with psycopg.connect(dsn) as admin:
            pgqueue.configure_queue(admin, "default", max_depth=2000)
            admin.commit()
        with pytest.raises(pgqueue.QueueFull, match="maximum depth"):
            await pgqueue.enqueue_many_async(conn, [("t", {"i": i}) for i in range(1000)])
        await pgqueue.enqueue_async(conn, "t", {"still": "usable"})
        await conn.commit()
        cursor = await conn.execute("SELECT count(*) FROM pgqueue.jobs")
        assert await cursor.fetchone() == (1201,)


def test_a_bad_job_found_while_streaming_takes_back_the_whole_call(dsn: str) -> None:
    good = [("t", {"i": i}) for i in range(5000)]
    with psycopg.connect(dsn) as conn:
        kept = pgqueue.enqueue(conn, "kept", {})
        with pytest.raises(TypeError, match=r"jobs\[4321\]: .*a set"):
            pgqueue.enqueue_many(conn, [*good[:4321], ("t", {"bad": {1}}), *good[4321:]])
        with pytest.raises(PayloadTooLarge, match=r"jobs\[2500\]"):
            pgqueue.enqueue_many(conn, [*good[:2500], ("t", {"blob": "x" * 300_000}), *good])
        with pytest.raises(TypeError, match=r"jobs\[3000\]: each job must be a JobSpec"):
            pgqueue.enqueue_many(conn, [*good[:3000], ("t", {}, "extra"), *good])
        with pytest.raises(ValueError, match=r"jobs\[1200\]: invalid task name"):
            pgqueue.enqueue_many(conn, [*good[:1200], ("rm -rf", {}), *good])
        conn.commit()
        assert conn.execute("SELECT array_agg(id) FROM pgqueue.jobs").fetchone() == ([kept],)


async def test_a_bad_streamed_job_on_an_autocommit_connection_commits_nothing(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(TypeError, match=r"jobs\[1999\]: args of task 't' must be a mapping"):
            await pgqueue.enqueue_many_async(conn, [("t", {})] * 1999 + [("t", [1])])
        ids = await pgqueue.enqueue_many_async(conn, [("t", {"i": i}) for i in range(1500)])
        cursor = await conn.execute("SELECT count(*), min(id), max(id) FROM pgqueue.jobs")
        assert await cursor.fetchone() == (1500, ids[0], ids[-1])


def test_streamed_jobs_share_the_call_options(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        ids = pgqueue.enqueue_many(
            conn,
            [("t", {"i": i}) for i in range(1500)],
            queue="shared",
            priority=5,
            delay=30,
            max_attempts=4,
            timeout=1.5,
            headers={"trace": "a\\b"},
        )
        conn.commit()
        rows = conn.execute(
            "SELECT id, queue, args, headers, priority, max_attempts, timeout_seconds, "
            "extract(epoch FROM run_at - created_at) FROM pgqueue.jobs ORDER BY id"
        ).fetchall()
    assert [row[0] for row in rows] == ids and len(rows) == 1500
    assert rows[1499][1:7] == ("shared", {"i": 1499}, {"trace": "a\\b"}, 5, 4, 1.5)
    delays = sorted(float(row[7]) for row in rows)
    assert delays[0] == pytest.approx(30, abs=0.001) and delays[-1] == delays[0]


def test_streamed_jobs_follow_a_sqlalchemy_session(dsn: str) -> None:
    engine = create_engine(_sa_url(dsn))
    try:
        with Session(engine) as session:
            pgqueue.enqueue_many(session, [("t", {"i": i}) for i in range(1500)])
            session.rollback()
            ids = pgqueue.enqueue_many(session, [("t", {"i": i}) for i in range(1500)])
            session.commit()
            count = session.execute(text("SELECT count(*), min(id) FROM pgqueue.jobs")).one()
        assert tuple(count) == (1500, ids[0])
    finally:
        engine.dispose()


async def test_single_enqueue_works_whatever_row_factory_the_caller_uses(dsn: str) -> None:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        plain = pgqueue.enqueue(conn, "t", {"n": 1}, queue="rows")
        keyed = pgqueue.enqueue(conn, "t", {"n": 2}, queue="rows", ordering_key="k")
        again = pgqueue.enqueue(conn, "t", {"n": 3}, queue="rows", unique_key="u")
        assert pgqueue.enqueue(conn, "t", {"n": 4}, queue="rows", unique_key="u") == again
        conn.commit()
    async with await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as aconn:
        async_plain = await pgqueue.enqueue_async(aconn, "t", {"n": 5}, queue="rows")
        async_keyed = await pgqueue.enqueue_async(
            aconn, "t", {"n": 6}, queue="rows", ordering_key="k"
        )
        await aconn.commit()
    with psycopg.connect(dsn) as conn:
        stored = conn.execute(
            "SELECT id, args->>'n' FROM pgqueue.jobs WHERE queue = 'rows' ORDER BY id"
        ).fetchall()
    assert stored == [
        (plain, "1"),
        (keyed, "2"),
        (again, "3"),
        (async_plain, "5"),
        (async_keyed, "6"),
    ]
