"""The worker against real PostgreSQL: outcomes, backoff on the database clock, fencing."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psycopg
import pytest

import pgqueue
from tests.database import migrate_to
from tests.integration.worker_runner import enqueue, jobs_left, running_worker, scalar, wait_until

FAST = pgqueue.RetryPolicy(base_seconds=0.05, max_seconds=0.1)


def dead(dsn: str, job_id: int) -> tuple[Any, ...] | None:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT task, attempts, reason, last_error FROM pgqueue.dead_jobs WHERE id = %s",
            (job_id,),
        ).fetchone()


def test_sync_and_async_handlers_run_once_and_leave_the_hot_table(dsn: str) -> None:
    app = pgqueue.App()
    seen: list[tuple[str, int]] = []

    @app.task
    def sync_task(job: pgqueue.Job, n: int) -> None:
        seen.append(("sync", n))

    @app.task
    async def async_task(job: pgqueue.Job, n: int) -> None:
        await asyncio.sleep(0)
        seen.append(("async", n))

    with psycopg.connect(dsn) as conn:
        pgqueue.enqueue_many(conn, [("sync_task", {"n": n}) for n in range(300)])
        pgqueue.enqueue_many(conn, [("async_task", {"n": n}) for n in range(300)])
        conn.commit()
    with running_worker(app, dsn, concurrency=8) as worker:
        wait_until(lambda: jobs_left(dsn) == 0)
    assert sorted(seen) == sorted(
        [("sync", n) for n in range(300)] + [("async", n) for n in range(300)]
    )
    assert worker.stats.completed == 600 and worker.stats.lost == 0
    assert scalar(dsn, "SELECT sum(completed) FROM pgqueue.queue_throughput") == 600
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0


def test_a_handler_sees_its_jobs_fields_as_stored(dsn: str) -> None:
    app = pgqueue.App()
    seen: list[pgqueue.Job] = []

    @app.task(queue="fields")
    def record(job: pgqueue.Job, n: int) -> None:
        seen.append(job)

    job_id = enqueue(
        dsn,
        "record",
        {"n": 1},
        queue="fields",
        priority=3,
        headers={"trace": "t-1"},
        ordering_key="k",
        max_attempts=4,
        timeout=9.5,
    )
    with psycopg.connect(dsn) as conn:
        stored = conn.execute(
            "SELECT created_at, run_at FROM pgqueue.jobs WHERE id = %s", (job_id,)
        ).fetchone()
    assert stored is not None
    with running_worker(app, dsn, queues=["fields"]):
        wait_until(lambda: len(seen) == 1)
    (job,) = seen
    assert (job.id, job.queue, job.task, dict(job.args), dict(job.headers)) == (
        job_id,
        "fields",
        "record",
        {"n": 1},
        {"trace": "t-1"},
    )
    assert (job.priority, job.attempt, job.max_attempts, job.timeout_seconds) == (3, 1, 4, 9.5)
    assert job.ordering_key == "k" and job.is_last_attempt is False
    assert (job.created_at, job.run_at) == stored
    assert job.created_at.tzinfo is not None


def test_retry_delays_follow_the_policy_on_the_database_clock(dsn: str) -> None:
    app = pgqueue.App()
    policy = pgqueue.RetryPolicy(base_seconds=0.4, multiplier=2, max_seconds=10, jitter=False)
    marks: list[tuple[Any, Any]] = []

    @app.task(max_attempts=3, retry=policy)
    def flaky(job: pgqueue.Job) -> None:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT clock_timestamp()").fetchone()
        assert row is not None
        marks.append((job.run_at, row[0]))
        raise RuntimeError(f"attempt {job.attempt} failed")

    job_id = enqueue(dsn, "flaky")
    with running_worker(app, dsn, poll_seconds=0.05):
        wait_until(lambda: dead(dsn, job_id) is not None)
    assert len(marks) == 3
    # run_at of attempt n+1 minus the database time of failure n is the backoff delay.
    gaps = [(marks[i + 1][0] - marks[i][1]).total_seconds() for i in range(2)]
    for gap, expected in zip(gaps, [0.4, 0.8], strict=False):
        assert expected <= gap <= expected + 0.5, gaps
    task, attempts, reason, error = dead(dsn, job_id) or ()
    assert (task, attempts, reason) == ("flaky", 3, "max_attempts")
    assert "RuntimeError: attempt 3 failed" in error and "Traceback" in error


def test_retry_snooze_cancel_and_non_retryable(dsn: str) -> None:
    app = pgqueue.App()
    attempts: dict[str, list[int]] = {}

    class Unfixable(Exception):
        pass

    @app.task(max_attempts=2, retry=FAST, non_retryable=[Unfixable])
    def control(job: pgqueue.Job, mode: str) -> None:
        attempts.setdefault(mode, []).append(job.attempt)
        runs = len(attempts[mode])
        if mode == "snooze" and runs <= 3:
            raise pgqueue.Snooze(0.05)
        if mode == "retry" and runs == 1:
            raise pgqueue.Retry(0.05)
        if mode == "cancel":
            raise pgqueue.Cancel("customer closed the account")
        if mode == "unfixable":
            raise Unfixable("bad data")
        if mode == "marker":
            raise pgqueue.NonRetryable("no")

    ids = {
        mode: enqueue(dsn, "control", {"mode": mode})
        for mode in ("snooze", "retry", "cancel", "unfixable", "marker")
    }
    with running_worker(app, dsn, poll_seconds=0.05):
        wait_until(lambda: jobs_left(dsn) == 0)
    # Three snoozes did not use up the two attempts: the fourth run is still attempt 1.
    assert attempts["snooze"] == [1, 1, 1, 1]
    assert attempts["retry"] == [1, 2]
    assert dead(dsn, ids["snooze"]) is None and dead(dsn, ids["retry"]) is None
    cancel = dead(dsn, ids["cancel"])
    assert cancel is not None and cancel[1:3] == (1, "cancelled")
    assert "customer closed the account" in cancel[3]
    assert (dead(dsn, ids["unfixable"]) or ())[1:3] == (1, "non_retryable")
    assert (dead(dsn, ids["marker"]) or ())[1:3] == (1, "non_retryable")


def test_unknown_task_and_bad_arguments_are_dead_lettered_and_the_worker_goes_on(dsn: str) -> None:
    app = pgqueue.App()
    done: list[int] = []

    @app.task
    def known(job: pgqueue.Job, n: int) -> None:
        done.append(n)

    unknown = enqueue(dsn, "vanished_task", {"n": 1})
    wrong = enqueue(dsn, "known", {"m": 1})
    with psycopg.connect(dsn) as conn:
        corrupt = conn.execute(
            "INSERT INTO pgqueue.jobs (queue, task, args) VALUES ('default', 'known', '[1]') "
            "RETURNING id"
        ).fetchone()
        conn.commit()
    assert corrupt is not None
    good = enqueue(dsn, "known", {"n": 2})
    with running_worker(app, dsn):
        wait_until(lambda: jobs_left(dsn) == 0)
    assert done == [2] and good
    assert (dead(dsn, unknown) or ())[2] == "unknown_task"
    assert "no task named 'vanished_task'" in (dead(dsn, unknown) or ())[3]
    assert (dead(dsn, wrong) or ())[2] == "bad_arguments"
    assert (dead(dsn, corrupt[0]) or ())[2] == "bad_arguments"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_job_transaction_commits_writes_with_the_ack_or_not_at_all(dsn: str, kind: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE receipts (order_id int PRIMARY KEY)")
    app = pgqueue.App()

    if kind == "sync":

        @app.task(max_attempts=3, retry=FAST)
        def receipt(job: pgqueue.Job, order_id: int, fail_first: bool) -> None:
            with job.transaction() as conn:
                conn.execute("INSERT INTO receipts VALUES (%s)", (order_id,))
                if fail_first and job.attempt == 1:
                    raise RuntimeError("crash inside the transaction")

    else:

        @app.task(name="receipt", max_attempts=3, retry=FAST)
        async def receipt_async(job: pgqueue.Job, order_id: int, fail_first: bool) -> None:
            async with job.transaction() as conn:
                await conn.execute("INSERT INTO receipts VALUES (%s)", (order_id,))
                if fail_first and job.attempt == 1:
                    raise RuntimeError("crash inside the transaction")

    ok = enqueue(dsn, "receipt", {"order_id": 1, "fail_first": False})
    retried = enqueue(dsn, "receipt", {"order_id": 2, "fail_first": True})
    with running_worker(app, dsn, poll_seconds=0.05) as worker:
        wait_until(lambda: jobs_left(dsn) == 0)
    # Job 2's first insert rolled back with its failed attempt; the retry inserted once.
    assert scalar(dsn, "SELECT array_agg(order_id ORDER BY order_id) FROM receipts") == [1, 2]
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0
    assert worker.stats.completed == 2 and ok and retried


def test_job_transaction_rolls_back_when_the_lease_was_lost(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE receipts (order_id int)")
    app = pgqueue.App()
    inside = threading.Event()
    proceed = threading.Event()
    raised: list[BaseException] = []

    @app.task(max_attempts=1)
    def receipt(job: pgqueue.Job) -> None:
        try:
            with job.transaction() as conn:
                conn.execute("INSERT INTO receipts VALUES (1)")
                inside.set()
                proceed.wait(10)
        except pgqueue.LeaseLost as exc:
            raised.append(exc)
            raise

    job_id = enqueue(dsn, "receipt")
    with running_worker(app, dsn, lease_seconds=30):
        assert inside.wait(10)
        # Another worker takes the job over (as rescue would after a lost lease).
        with psycopg.connect(dsn) as conn:
            conn.execute(
                "UPDATE pgqueue.jobs SET lease_token = gen_random_uuid() WHERE id = %s", (job_id,)
            )
            conn.commit()
        proceed.set()
        wait_until(lambda: raised)
    assert scalar(dsn, "SELECT count(*) FROM receipts") == 0
    # The usurper still holds the job; the zombie's failure was not written either.
    assert scalar(dsn, "SELECT state FROM pgqueue.jobs WHERE id = %s", (job_id,)) == "running"
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0


def test_hard_timeout_stops_async_and_busy_sync_handlers(dsn: str) -> None:
    app = pgqueue.App()

    @app.task(max_attempts=1, timeout=0.3)
    async def slow_async(job: pgqueue.Job) -> None:
        await asyncio.sleep(30)

    @app.task(max_attempts=1, timeout=0.3)
    def busy_sync(job: pgqueue.Job) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pass

    a = enqueue(dsn, "slow_async")
    b = enqueue(dsn, "busy_sync")
    started = time.monotonic()
    with running_worker(app, dsn):
        wait_until(lambda: jobs_left(dsn) == 0, timeout=15)
    assert time.monotonic() - started < 15
    for job_id in (a, b):
        row = dead(dsn, job_id)
        assert row is not None and row[2] == "max_attempts"
        assert "JobTimeout: handler ran past its timeout of 0.3s" in row[3]


def test_heartbeats_keep_a_long_job_leased(dsn: str) -> None:
    app = pgqueue.App()
    runs: list[int] = []

    @app.task(max_attempts=5)
    def long_job(job: pgqueue.Job) -> None:
        runs.append(job.attempt)
        time.sleep(3.5)  # blocking: heartbeats must come from elsewhere

    enqueue(dsn, "long_job")
    with running_worker(app, dsn, lease_seconds=1.0, concurrency=2):
        wait_until(lambda: jobs_left(dsn) == 0, timeout=20)
    assert runs == [1]


def test_listen_wakes_an_idle_worker_long_before_the_poll(dsn: str) -> None:
    app = pgqueue.App()
    picked: list[float] = []

    @app.task
    def ping(job: pgqueue.Job) -> None:
        picked.append(time.monotonic())

    with running_worker(app, dsn, poll_seconds=60):
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM pgqueue.processes") == 1)
        time.sleep(0.5)  # let the first (empty) claim pass and LISTEN settle
        sent = time.monotonic()
        enqueue(dsn, "ping")
        wait_until(lambda: picked, timeout=30)
    assert picked[0] - sent < 30  # well under the 60 s poll: NOTIFY woke it


def test_rescue_requeues_expired_leases_and_dead_letters_exhausted_ones(dsn: str) -> None:
    app = pgqueue.App()
    done: list[int] = []

    @app.task
    def work(job: pgqueue.Job, n: int) -> None:
        done.append(n)

    with psycopg.connect(dsn) as conn:
        # Two jobs held by a worker that vanished: one has attempts left, one does not.
        conn.execute(
            "INSERT INTO pgqueue.jobs (queue, task, args, state, attempts, max_attempts, "
            "lease_token, lease_expires_at, worker_id) VALUES "
            "('default', 'work', '{\"n\": 1}', 'running', 1, 3, gen_random_uuid(), "
            " now() - interval '1 second', gen_random_uuid()),"
            "('default', 'work', '{\"n\": 2}', 'running', 3, 3, gen_random_uuid(), "
            " now() - interval '1 second', gen_random_uuid())"
        )
        conn.commit()
    with running_worker(app, dsn, lease_seconds=1.0):
        wait_until(lambda: jobs_left(dsn) == 0)
    assert done == [1]
    assert scalar(dsn, "SELECT reason FROM pgqueue.dead_jobs") == "lease_expired"


def test_worker_registers_itself_and_leaves_cleanly(dsn: str) -> None:
    app = pgqueue.App()

    @app.task(queue="email")
    def noop(job: pgqueue.Job) -> None: ...

    with running_worker(app, dsn) as worker:
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM pgqueue.workers") == 1)
        row = scalar(dsn, "SELECT queues FROM pgqueue.workers WHERE worker_id = %s", (worker.id,))
        assert row == ["email"]
        names = scalar(
            dsn,
            "SELECT array_agg(DISTINCT application_name) FROM pg_stat_activity "
            "WHERE application_name LIKE 'pgqueue-%%'",
        )
        assert any(name.startswith("pgqueue-worker@") for name in names)
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.workers") == 0
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.queues WHERE name = 'email'") == 1


def test_a_running_worker_freezes_the_start_up_heap_and_thaws_it_when_it_stops(dsn: str) -> None:
    import gc

    app = pgqueue.App()
    seen: list[int] = []

    @app.task(queue="heap")
    def record(job: pgqueue.Job) -> None:
        seen.append(gc.get_freeze_count())

    assert gc.get_freeze_count() == 0
    enqueue(dsn, "record", {}, queue="heap")
    with running_worker(app, dsn, queues=["heap"]):
        wait_until(lambda: seen)
    assert seen[0] > 0  # the imports and the app were out of the collector's reach
    assert gc.get_freeze_count() == 0  # and back in it once the worker stopped
    gc.freeze()
    try:  # a freeze made by someone else (a pre-fork server) is left alone
        enqueue(dsn, "record", {}, queue="heap")
        with running_worker(app, dsn, queues=["heap"]):
            wait_until(lambda: len(seen) == 2)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_stop_is_not_held_up_by_a_settle_write_that_keeps_failing(dsn: str) -> None:
    # Every write of outcomes fails (a constraint the counter cannot meet): the writer
    # retries, and a graceful stop hands over to the final flush, which gives up after a
    # few tries; the leases then expire and the jobs run again elsewhere.
    app = pgqueue.App()

    @app.task
    async def quick(job: pgqueue.Job, n: int) -> None:
        pass

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE pgqueue.queue_throughput"
            " ADD CONSTRAINT refuse_all CHECK (completed < 0) NOT VALID"
        )
    ids = [enqueue(dsn, "quick", {"n": n}) for n in range(5)]
    with running_worker(app, dsn, shutdown_grace_seconds=1.0) as worker:
        wait_until(lambda: worker.stats.claimed == 5)
        time.sleep(1.0)  # the writer is now retrying with backoff
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 20
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE id = ANY(%s)", (ids,)) == 5


@pytest.mark.parametrize(
    "revision",
    [
        # Its claim needs the claim_jobs of 0007.
        "0006_outbox_handoff",
        # Its busy mark (written before the first claim) needs the column of 0008.
        "0007_lean_claim",
    ],
)
def test_a_worker_newer_than_the_schema_stops_with_exit_code_3_and_runs_nothing(
    empty_dsn: str, revision: str
) -> None:
    # A worker of this version against an older schema must stop with a clear exit code,
    # not retry forever.
    migrate_to(empty_dsn, revision)
    with psycopg.connect(empty_dsn) as conn:
        for n in range(3):
            pgqueue.enqueue(conn, "record", {"n": n})
    ran: list[int] = []
    app = pgqueue.App()

    @app.task()
    def record(job: pgqueue.Job, n: int) -> None:
        ran.append(n)

    worker = pgqueue.Worker(app, empty_dsn, settings=pgqueue.WorkerSettings(poll_seconds=0.1))
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run(install_signals=False)))
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the worker kept running against an older schema"
    assert codes == [3] and ran == []
    assert scalar(empty_dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'available'") == 3
