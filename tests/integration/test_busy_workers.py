"""A one-job enqueue sends its NOTIFY only when a worker of the queue may be waiting for it,
and a worker that stops being busy misses no job that skipped its NOTIFY (migration 0008)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import psycopg
import pytest

import pgqueue
from pgqueue.db import channel
from tests.integration.worker_runner import jobs_left, running_worker, scalar, wait_until

# Long enough that a test passing within it did not wait for the poll.
POLL_SECONDS = 30.0


def _process(conn: psycopg.Connection[Any], kind: str, queues: list[str], busy: bool) -> None:
    conn.execute(
        "INSERT INTO pgqueue.processes (id, kind, host, pid, queues, concurrency, busy_since) "
        "VALUES (%s, %s, 'test', 1, %s, 1, CASE WHEN %s THEN now() END)",
        (uuid.uuid4(), kind, queues, busy),
    )


@pytest.mark.parametrize(
    ("processes", "notified"),
    [
        # No row proves nobody listens (a live worker's row may have been pruned).
        pytest.param([], True, id="no-worker-row"),
        pytest.param([("worker", ["email"], False)], True, id="a-worker-waits"),
        pytest.param([("worker", ["email"], True)], False, id="the-worker-is-busy"),
        pytest.param(
            [("worker", ["email"], True), ("worker", ["sms", "email"], False)],
            True,
            id="one-of-two-waits",
        ),
        pytest.param(
            [("worker", ["email"], True), ("worker", ["sms"], False)],
            False,
            id="a-worker-of-another-queue-waits",
        ),
        pytest.param(
            [("worker", ["email"], True), ("relay", ["email"], False)], False, id="a-relay"
        ),
    ],
)
def test_a_one_job_enqueue_notifies_only_when_a_worker_of_its_queue_may_wait(
    dsn: str, processes: list[tuple[str, list[str], bool]], notified: bool
) -> None:
    with psycopg.connect(dsn, autocommit=True) as setup:
        for kind, queues, busy in processes:
            _process(setup, kind, queues, busy)
    with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn) as producer:
        listener.execute(f'LISTEN "{channel("pgqueue", "email")}"')
        pgqueue.enqueue(producer, "t", {}, queue="email")
        pgqueue.enqueue(producer, "t", {}, queue="email", delay=60)  # not due: never
        producer.commit()
        received = list(listener.notifies(timeout=0.5))
    assert len(received) == (1 if notified else 0)
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE queue = 'email'") == 2


@pytest.mark.parametrize(
    "isolation", [psycopg.IsolationLevel.REPEATABLE_READ, psycopg.IsolationLevel.SERIALIZABLE]
)
def test_a_producer_in_a_stricter_isolation_level_always_notifies(
    dsn: str, isolation: psycopg.IsolationLevel
) -> None:
    # Its snapshot may predate its INSERT, so the busy marks it reads prove nothing.
    with psycopg.connect(dsn, autocommit=True) as setup:
        _process(setup, "worker", ["email"], busy=True)
    with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn) as producer:
        producer.isolation_level = isolation
        listener.execute(f'LISTEN "{channel("pgqueue", "email")}"')
        pgqueue.enqueue(producer, "t", {}, queue="email")
        producer.commit()
        assert len(list(listener.notifies(timeout=0.5))) == 1


def test_a_job_that_skipped_its_notify_runs_soon_after_its_worker_stops_being_busy(
    dsn: str,
) -> None:
    """The producer read the busy mark before the worker cleared it, so it sent no NOTIFY;
    its transaction was still open then, so the worker claims again as soon as it ends,
    long before the poll, though another transaction stays open all along."""
    app = pgqueue.App()
    ran: list[str] = []

    @app.task(queue="race")
    async def slow(job: pgqueue.Job, n: int) -> None:
        await asyncio.sleep(0.03)

    @app.task(queue="race")
    def record(job: pgqueue.Job) -> None:
        ran.append("record")

    busy_sql = "SELECT busy_since IS NOT NULL FROM pgqueue.processes WHERE id = %s"
    with (
        psycopg.connect(dsn) as other,
        psycopg.connect(dsn, autocommit=True) as listener,
        psycopg.connect(dsn) as producer,
    ):
        other.execute("SELECT pg_current_xact_id()")  # open, with an id, until the end
        listener.execute(f'LISTEN "{channel("pgqueue", "race")}"')
        pgqueue.enqueue_many(producer, [("slow", {"n": n}) for n in range(80)], queue="race")
        producer.commit()
        list(listener.notifies(timeout=0.2))  # the bulk enqueue's own NOTIFY
        with running_worker(
            app, dsn, queues=["race"], concurrency=1, batch_size=1, poll_seconds=POLL_SECONDS
        ) as worker:
            wait_until(lambda: scalar(dsn, busy_sql, (worker.id,)))
            pgqueue.enqueue(producer, "record", {}, queue="race")  # sees it busy
            wait_until(lambda: scalar(dsn, busy_sql, (worker.id,)) is False, timeout=30.0)
            time.sleep(0.3)  # the worker waits now, and found nothing to run
            assert not ran
            producer.commit()
            committed = time.monotonic()
            assert list(listener.notifies(timeout=0.2)) == []  # it was skipped
            wait_until(lambda: ran, timeout=10.0)
            assert time.monotonic() - committed < 10.0 < POLL_SECONDS
    assert jobs_left(dsn) == 0


def test_a_worker_that_claims_full_batches_is_marked_busy_and_unmarked_when_it_waits(
    dsn: str,
) -> None:
    app = pgqueue.App()
    ran: list[int] = []

    @app.task(queue="busy")
    async def slow(job: pgqueue.Job, n: int) -> None:
        await asyncio.sleep(0.02)
        ran.append(n)

    with psycopg.connect(dsn) as conn:
        pgqueue.enqueue_many(conn, [("slow", {"n": n}) for n in range(150)], queue="busy")
        conn.commit()
    busy_sql = "SELECT busy_since IS NOT NULL FROM pgqueue.processes WHERE id = %s"
    with running_worker(
        app, dsn, queues=["busy"], concurrency=1, batch_size=1, poll_seconds=POLL_SECONDS
    ) as worker:
        # One job at a time for about 3 s: every claim fills its batch of one.
        wait_until(lambda: scalar(dsn, busy_sql, (worker.id,)), timeout=20.0)
        assert jobs_left(dsn) > 0
        wait_until(lambda: jobs_left(dsn) == 0, timeout=30.0)
        # Out of work: the mark is cleared before the worker waits, and a NOTIFY wakes it.
        wait_until(lambda: scalar(dsn, busy_sql, (worker.id,)) is False)
        with psycopg.connect(dsn) as conn:
            pgqueue.enqueue(conn, "slow", {"n": 150}, queue="busy")
            conn.commit()
        wait_until(lambda: 150 in ran, timeout=10.0)
    assert sorted(ran) == list(range(151))


def test_a_worker_without_listen_is_marked_busy_at_once(dsn: str) -> None:
    app = pgqueue.App()

    @app.task(queue="polled")
    def noop(job: pgqueue.Job) -> None: ...

    with running_worker(app, dsn, queues=["polled"], listen=False) as worker:
        wait_until(
            lambda: scalar(
                dsn,
                "SELECT busy_since IS NOT NULL FROM pgqueue.processes WHERE id = %s",
                (worker.id,),
            )
        )
        with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn) as producer:
            listener.execute(f'LISTEN "{channel("pgqueue", "polled")}"')
            pgqueue.enqueue(producer, "noop", {}, queue="polled")
            producer.commit()
            assert list(listener.notifies(timeout=0.5)) == []
        wait_until(lambda: jobs_left(dsn) == 0)
