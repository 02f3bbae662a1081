"""Flow control against real PostgreSQL: unique keys under racing transactions, the ordering-key
failure policy, pause/resume, backpressure, payload limits and batch handlers.

The multi-process scenarios (ordering across workers, global limits, rate limits, cron) are
in tests/faults/test_flow_control_processes.py; here a Worker runs on a thread when needed.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from itertools import pairwise
from typing import Any

import psycopg
import pytest

import pgqueue
from pgqueue.queues import configure_queue, list_queues, pause_queue, resume_queue
from tests.integration.worker_runner import enqueue, running_worker, scalar, wait_until

FAST = pgqueue.RetryPolicy(base_seconds=0.05, max_seconds=0.1)


def rows(dsn: str, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, params).fetchall()


def execute(dsn: str, statement: str, params: Any = ()) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)


def states(dsn: str, ids: list[int]) -> list[str | None]:
    found = dict(rows(dsn, "SELECT id, state FROM pgqueue.jobs WHERE id = ANY(%s)", (ids,)))
    return [found.get(i) for i in ids]


# ---------------------------------------------------------------- unique keys


def _race(dsn: str, round_number: int, first: int | None) -> dict[int, int]:
    """20 transactions enqueue one unique key at once; the odd ones commit, the even roll back.

    With ``first``, that caller enqueues before the others start (and holds its transaction
    open longest). Returns the id each caller got; fails on any error a caller saw.
    """
    key = f"invoice-{round_number}"
    barrier = threading.Barrier(20)
    first_done = threading.Event()
    returned: dict[int, int] = {}
    errors: list[BaseException] = []
    pauses = random.Random(round_number)
    holds = [pauses.uniform(0, 0.05) for _ in range(20)]
    if first is not None:
        holds[first] = 0.2

    def caller(index: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=False) as conn:
                conn.execute(
                    "INSERT INTO invoices (caller, round) VALUES (%s, %s)", (index, round_number)
                )
                barrier.wait(10)
                if first is not None and index != first:
                    first_done.wait(10)
                job_id = pgqueue.enqueue(
                    conn, "bill", {"caller": index}, queue="billing", unique_key=key
                )
                if index == first:
                    first_done.set()
                time.sleep(holds[index])
                # The transaction is intact after the enqueue, whoever won the race.
                conn.execute("SELECT 1")
                if index % 2:
                    conn.commit()
                else:
                    conn.rollback()
                returned[index] = job_id
        except BaseException as exc:  # any error at all fails the test
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [], f"round {round_number}: callers saw {errors!r}"
    assert len(returned) == 20
    return returned


def test_twenty_racing_transactions_on_one_unique_key_leave_exactly_one_job(dsn: str) -> None:
    execute(dsn, "CREATE TABLE invoices (caller int NOT NULL, round int NOT NULL)")
    committed = [i for i in range(20) if i % 2]
    for round_number, first in enumerate([0, None, 1, None, 0, None]):
        returned = _race(dsn, round_number, first)
        jobs = rows(
            dsn,
            "SELECT id, args->>'caller' FROM pgqueue.jobs WHERE unique_key = %s",
            (f"invoice-{round_number}",),
        )
        assert len(jobs) == 1, f"round {round_number}: {jobs}"
        job_id, owner = jobs[0]
        assert {returned[i] for i in committed} == {job_id}, "every committer got the live job"
        assert int(owner) in committed, "the job belongs to a transaction that committed"
        if first is not None and first % 2 == 0:
            # The first inserter rolled back: the others waited for it, then one took over.
            assert returned[first] != job_id
        invoices = rows(dsn, "SELECT caller FROM invoices WHERE round = %s", (round_number,))
        assert sorted(c for (c,) in invoices) == committed, "committers kept their own work"


def test_duplicate_returns_or_raises_with_the_existing_id_and_the_transaction_goes_on(
    dsn: str,
) -> None:
    first = enqueue(dsn, "bill", {"n": 1}, unique_key="inv-9")
    with psycopg.connect(dsn) as conn:
        assert pgqueue.enqueue(conn, "bill", {"n": 2}, unique_key="inv-9") == first
        with pytest.raises(pgqueue.DuplicateJob) as raised:
            pgqueue.enqueue(conn, "bill", {"n": 3}, unique_key="inv-9", on_duplicate="raise")
        assert raised.value.job_id == first
        assert str(first) in str(raised.value)
        # The same key in another queue is another job; the caller's transaction still works.
        other = pgqueue.enqueue(conn, "bill", {"n": 4}, queue="other", unique_key="inv-9")
        many = pgqueue.enqueue_many(
            conn, [pgqueue.JobSpec("bill", {"n": 5}, unique_key=k) for k in ("inv-9", "inv-10")]
        )
        conn.commit()
    assert many[0] == first and many[1] not in (first, other)
    assert rows(dsn, "SELECT id, args->>'n' FROM pgqueue.jobs ORDER BY id") == [
        (first, "1"),
        (other, "4"),
        (many[1], "5"),
    ]


def test_a_unique_key_is_held_while_live_and_freed_once_the_job_is_done(dsn: str) -> None:
    app = pgqueue.App()
    gate = threading.Event()

    @app.task(queue="billing", max_attempts=1)
    def bill(job: pgqueue.Job, n: int, fail: bool = False) -> None:
        gate.wait(10)
        if fail:
            raise pgqueue.NonRetryable("declined")

    scheduled = enqueue(dsn, "bill", {"n": 0}, queue="billing", unique_key="s", delay=60)
    assert enqueue(dsn, "bill", {"n": 1}, queue="billing", unique_key="s") == scheduled

    running = enqueue(dsn, "bill", {"n": 2}, queue="billing", unique_key="r")
    failing = enqueue(dsn, "bill", {"n": 3, "fail": True}, queue="billing", unique_key="f")
    with running_worker(app, dsn, poll_seconds=0.05):
        wait_until(lambda: states(dsn, [running, failing]) == ["running", "running"])
        assert enqueue(dsn, "bill", {"n": 4}, queue="billing", unique_key="r") == running
        assert enqueue(dsn, "bill", {"n": 5}, queue="billing", unique_key="f") == failing
        gate.set()
        wait_until(lambda: states(dsn, [running, failing]) == [None, None])

    # Completed and dead-lettered jobs are not live: the key takes a new job.
    again = enqueue(dsn, "bill", {"n": 6}, queue="billing", unique_key="r")
    after_dead = enqueue(dsn, "bill", {"n": 7}, queue="billing", unique_key="f")
    assert again not in (running, failing) and after_dead not in (running, failing, again)
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.dead_jobs WHERE id = %s", (failing,)) == 1
    assert enqueue(dsn, "bill", {"n": 8}, queue="billing", unique_key="s") == scheduled


# ---------------------------------------------------------------- ordering-key failure policy


def _keyed_app(
    dead_blocks_key: bool = True, broken: set[int] | None = None
) -> tuple[pgqueue.App, list[tuple[Any, ...]]]:
    """An app whose task ``step`` records (key, n, attempt, time) of every run.

    ``fail`` dead-letters a job at once; so does any ``n`` in ``broken`` while it is there.
    """
    app = pgqueue.App()
    runs: list[tuple[Any, ...]] = []
    lock = threading.Lock()

    @app.task(queue="keys", max_attempts=3, dead_blocks_key=dead_blocks_key)
    def step(job: pgqueue.Job, n: int, retry_once: bool = False, fail: bool = False) -> None:
        with lock:
            runs.append((job.ordering_key, n, job.attempt, time.monotonic()))
        if fail or n in (broken or ()):
            raise pgqueue.NonRetryable(f"step {n} cannot work")
        if retry_once and job.attempt == 1:
            raise pgqueue.Retry(delay=1.0, reason="downstream busy")
        time.sleep(0.01)

    return app, runs


def _enqueue_key(dsn: str, key: str, specs: list[dict[str, Any]]) -> list[int]:
    with psycopg.connect(dsn) as conn:
        ids = pgqueue.enqueue_many(
            conn, [pgqueue.JobSpec("step", s, queue="keys", ordering_key=key) for s in specs]
        )
        conn.commit()
    return ids


def test_the_key_waits_while_its_head_retries_and_other_keys_go_on(dsn: str) -> None:
    app, runs = _keyed_app()
    blocked = _enqueue_key(dsn, "k1", [{"n": 0, "retry_once": True}, {"n": 1}, {"n": 2}])
    free = _enqueue_key(dsn, "k2", [{"n": 0}, {"n": 1}, {"n": 2}])
    with running_worker(app, dsn, concurrency=4, poll_seconds=0.05):
        # Head scheduled for its retry: the rest of k1 waits; k2 runs meanwhile.
        wait_until(
            lambda: (
                states(dsn, blocked) == ["available", "waiting", "waiting"]
                and scalar(dsn, "SELECT attempts FROM pgqueue.jobs WHERE id = %s", (blocked[0],))
            )
        )
        wait_until(lambda: states(dsn, free) == [None, None, None])
        assert states(dsn, blocked[1:]) == ["waiting", "waiting"]
        assert rows(dsn, "SELECT key, reason, head_id, waiting FROM pgqueue.blocked_keys") == [
            ("k1", "retrying", blocked[0], 2)
        ]
        wait_until(lambda: states(dsn, blocked) == [None, None, None])
    k1 = [(n, attempt) for key, n, attempt, _ in runs if key == "k1"]
    assert k1 == [(0, 1), (0, 2), (1, 1), (2, 1)]
    k2_done = max(at for key, _, _, at in runs if key == "k2")
    head_retry = next(at for key, n, attempt, at in runs if (key, n, attempt) == ("k1", 0, 2))
    assert k2_done < head_retry, "k2 did not wait for k1's retry"


def test_a_dead_head_blocks_its_key_until_an_operator_discards_it(dsn: str) -> None:
    app, runs = _keyed_app()
    blocked = _enqueue_key(dsn, "k1", [{"n": 0, "fail": True}, {"n": 1}, {"n": 2}])
    free = _enqueue_key(dsn, "k2", [{"n": 0}, {"n": 1}])
    with running_worker(app, dsn, concurrency=4, poll_seconds=0.05):
        wait_until(lambda: states(dsn, free) == [None, None])
        wait_until(lambda: states(dsn, blocked) == [None, "waiting", "waiting"])
        dead = rows(
            dsn,
            "SELECT reason, ordering_key, blocks_key FROM pgqueue.dead_jobs WHERE id = %s",
            (blocked[0],),
        )
        assert dead == [("non_retryable", "k1", True)]
        # Jobs enqueued behind a dead head wait too.
        late = _enqueue_key(dsn, "k1", [{"n": 3}])
        assert states(dsn, late) == ["waiting"]
        # Operators see which keys are blocked, by which dead job, and what waits behind it.
        assert rows(
            dsn, "SELECT kind, queue, key, reason, head_id, waiting FROM pgqueue.blocked_keys"
        ) == [("job", "keys", "k1", "dead", blocked[0], 3)]
        assert states(dsn, blocked[1:] + late) == ["waiting", "waiting", "waiting"]

        # Discard (until `pgqueue dlq` exists): drop the dead row, advance the key.
        with psycopg.connect(dsn) as conn:
            conn.execute("DELETE FROM pgqueue.dead_jobs WHERE id = %s", (blocked[0],))
            promoted = conn.execute("SELECT pgqueue.job_key_advance('keys', 'k1')").fetchone()
            conn.commit()
        assert promoted == (blocked[1],)
        wait_until(lambda: states(dsn, blocked + late) == [None] * 4)
    assert [n for key, n, _, _ in runs if key == "k1"] == [0, 1, 2, 3]
    assert [n for key, n, _, _ in runs if key == "k2"] == [0, 1]


def test_a_requeued_dead_head_runs_first_then_the_key_goes_on_in_order(dsn: str) -> None:
    broken = {0}
    app, runs = _keyed_app(broken=broken)
    ids = _enqueue_key(dsn, "k1", [{"n": 0}, {"n": 1}, {"n": 2}])
    with running_worker(app, dsn, concurrency=4, poll_seconds=0.05):
        wait_until(lambda: states(dsn, ids) == [None, "waiting", "waiting"])
        broken.clear()  # the downstream outage is over
        with psycopg.connect(dsn) as conn:
            conn.execute("SELECT pgqueue.requeue_dead_jobs(%s)", ([ids[0]],))
            conn.commit()
        wait_until(lambda: states(dsn, ids) == [None, None, None])
    assert [(n, attempt) for _, n, attempt, _ in runs] == [(0, 1), (0, 1), (1, 1), (2, 1)]
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0


def test_with_dead_blocks_key_false_the_key_goes_on_without_its_dead_head(dsn: str) -> None:
    app, runs = _keyed_app(dead_blocks_key=False)
    ids = _enqueue_key(dsn, "k1", [{"n": 0, "fail": True}, {"n": 1}, {"n": 2}])
    with running_worker(app, dsn, concurrency=4, poll_seconds=0.05):
        wait_until(lambda: states(dsn, ids) == [None, None, None])
    assert [n for key, n, _, _ in runs if key == "k1"] == [0, 1, 2]
    assert rows(dsn, "SELECT id, blocks_key FROM pgqueue.dead_jobs") == [(ids[0], False)]
    # A later job of the key is not held back either.
    late = _enqueue_key(dsn, "k1", [{"n": 3}])
    assert states(dsn, late) == ["available"]


def test_one_bulk_call_keeps_input_order_within_a_key_when_some_jobs_are_unique(
    dsn: str,
) -> None:
    # Keyed jobs are inserted set-based, unique ones one by one: order must survive the mix.
    app, runs = _keyed_app()
    with psycopg.connect(dsn) as conn:
        ids = pgqueue.enqueue_many(
            conn,
            [
                pgqueue.JobSpec("step", {"n": 0}, ordering_key="k1"),
                pgqueue.JobSpec("step", {"n": 1}, ordering_key="k1", unique_key="once"),
                pgqueue.JobSpec("step", {"n": 2}, ordering_key="k1"),
            ],
            queue="keys",
        )
        conn.commit()
    with running_worker(app, dsn, concurrency=4, poll_seconds=0.05):
        wait_until(lambda: states(dsn, ids) == [None, None, None])
    assert [n for _, n, _, _ in runs] == [0, 1, 2]


# ---------------------------------------------------------------- pause and resume


def test_a_paused_queue_is_not_claimed_while_others_run_and_resume_runs_it(dsn: str) -> None:
    app = pgqueue.App()
    done: dict[str, list[int]] = defaultdict(list)
    release = threading.Event()

    @app.task(queue="alpha")
    def alpha(job: pgqueue.Job, n: int, hold: bool = False) -> None:
        if hold:
            release.wait(10)
        done["alpha"].append(n)

    @app.task(queue="beta")
    def beta(job: pgqueue.Job, n: int) -> None:
        done["beta"].append(n)

    holding = enqueue(dsn, "alpha", {"n": -1, "hold": True}, queue="alpha")
    with running_worker(app, dsn, queues=["alpha", "beta"], poll_seconds=0.05):
        wait_until(lambda: states(dsn, [holding]) == ["running"])
        with psycopg.connect(dsn) as conn:
            paused = pause_queue(conn, "alpha")
            conn.commit()
        assert paused.is_paused
        # Enqueue keeps working on a paused queue.
        alphas = [enqueue(dsn, "alpha", {"n": n}, queue="alpha") for n in range(5)]
        betas = [enqueue(dsn, "beta", {"n": n}, queue="beta") for n in range(5)]
        # The job already running when the queue was paused finishes normally.
        release.set()
        wait_until(lambda: states(dsn, [holding, *betas]) == [None] * 6)
        # Watch for many poll intervals: nothing of alpha is claimed.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert states(dsn, alphas) == ["available"] * 5
            time.sleep(0.05)
        assert done["alpha"] == [-1] and sorted(done["beta"]) == list(range(5))

        with psycopg.connect(dsn) as conn:
            assert not resume_queue(conn, "alpha").is_paused
            conn.commit()
        wait_until(lambda: states(dsn, alphas) == [None] * 5, timeout=10)
    assert sorted(done["alpha"]) == [-1, 0, 1, 2, 3, 4]


def test_queue_settings_are_validated_and_kept_unless_named(conn: psycopg.Connection) -> None:
    configure_queue(conn, "billing", concurrency_limit=3, rate_limit=(50, 1.0), max_depth=10)
    pause_queue(conn, "billing")
    changed = configure_queue(conn, "billing", rate_limit=None)
    assert changed.is_paused and changed.concurrency_limit == 3 and changed.max_depth == 10
    assert changed.rate_limit is None and changed.rate_interval_seconds is None
    assert [q.name for q in list_queues(conn)] == ["billing"]
    for bad in ({"concurrency_limit": 0}, {"max_depth": -1}, {"rate_limit": (5, 0)}):
        with pytest.raises(ValueError):
            configure_queue(conn, "billing", **bad)


def test_a_scheduler_running_late_still_enqueues_every_tick_within_the_grace(dsn: str) -> None:
    # Only ticks older than misfire_grace_seconds (60 s) may be skipped, not ones a stalled
    # scheduler (here 2.6 s) comes back to.
    app = pgqueue.App()

    @app.periodic("* * * * * *", queue="cron")
    def every_second(job: pgqueue.Job) -> None:
        pass

    @app.task(queue="cron")
    async def hog(job: pgqueue.Job) -> None:
        time.sleep(2.6)  # a careless async handler: the worker's event loop stalls

    def ticks() -> list[Any]:
        return [t for (t,) in rows(dsn, "SELECT tick_at FROM pgqueue.cron_ticks ORDER BY 1")]

    with running_worker(app, dsn, poll_seconds=0.05):
        wait_until(lambda: len(ticks()) >= 2)
        enqueue(dsn, "hog", queue="cron")
        stalled = len(ticks())
        wait_until(lambda: len(ticks()) >= stalled + 5, timeout=15)
    seen = ticks()
    gaps = [(later - earlier).total_seconds() for earlier, later in pairwise(seen)]
    assert set(gaps) == {1.0}, f"ticks lost: {seen}"


# ---------------------------------------------------------------- backpressure


def test_queue_full_is_raised_in_the_callers_transaction_which_keeps_its_work(dsn: str) -> None:
    execute(dsn, "CREATE TABLE orders (id int NOT NULL)")
    with psycopg.connect(dsn) as conn:
        configure_queue(conn, "small", max_depth=3)
        conn.commit()
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO orders VALUES (1)")
        kept = [pgqueue.enqueue(conn, "t", {"n": n}, queue="small") for n in range(3)]
        with pytest.raises(pgqueue.QueueFull) as raised:
            pgqueue.enqueue(conn, "t", {"n": 3}, queue="small")
        message = str(raised.value)
        assert "'small'" in message and "maximum depth" in message
        assert "nothing was enqueued by this call" in message
        # A bulk call that would overflow enqueues none of its jobs, not even other queues'.
        with pytest.raises(pgqueue.QueueFull):
            pgqueue.enqueue_many(
                conn,
                [pgqueue.JobSpec("t", {}, queue="other"), pgqueue.JobSpec("t", {}, queue="small")],
            )
        other = pgqueue.enqueue(conn, "t", {}, queue="other")
        conn.execute("INSERT INTO orders VALUES (2)")
        conn.commit()
    assert rows(dsn, "SELECT id FROM orders ORDER BY id") == [(1,), (2,)]
    assert rows(dsn, "SELECT id FROM pgqueue.jobs ORDER BY id") == [(i,) for i in [*kept, other]]

    # Running jobs do not count toward the depth: claiming one makes room for one.
    claimed = rows(
        dsn,
        "SELECT id FROM pgqueue.claim_jobs('small', 1, gen_random_uuid(), 30, '{}', '{}', 3)",
    )
    assert len(claimed) == 1
    assert enqueue(dsn, "t", {"n": 4}, queue="small") > 0
    with pytest.raises(pgqueue.QueueFull):
        enqueue(dsn, "t", {"n": 5}, queue="small")


def test_payload_too_large_is_raised_before_any_sql_and_keeps_the_transaction(
    dsn: str,
) -> None:
    execute(dsn, "CREATE TABLE orders (id int NOT NULL)")
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO orders VALUES (1)")
        first = pgqueue.enqueue(conn, "t", {"n": 1})
        with pytest.raises(pgqueue.PayloadTooLarge) as raised:
            pgqueue.enqueue(conn, "t", {"blob": "x" * 300_000})
        message = str(raised.value)
        assert "args is 300011 bytes of JSON, over the limit of 262144" in message
        assert "enqueue a reference" in message
        # Configurable per call, and one oversized item stops a whole bulk call.
        with pytest.raises(pgqueue.PayloadTooLarge, match="over the limit of 1000"):
            pgqueue.enqueue(conn, "t", {"blob": "x" * 2000}, max_payload_bytes=1000)
        with pytest.raises(pgqueue.PayloadTooLarge, match=r"^jobs\[1\]: args is"):
            pgqueue.enqueue_many(conn, [("t", {"n": 2}), ("t", {"blob": "x" * 300_000})])
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.commit()
    assert rows(dsn, "SELECT id FROM orders") == [(1,)]
    assert rows(dsn, "SELECT id FROM pgqueue.jobs") == [(first,)]

    # The database enforces the default limit too, whatever a client was told.
    with psycopg.connect(dsn) as conn:
        with pytest.raises(
            (pgqueue.PayloadTooLarge, pgqueue.DatabaseError), match=r"args_size|over the limit"
        ):
            pgqueue.enqueue(conn, "t", {"blob": "x" * 300_000}, max_payload_bytes=10**7)
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.jobs") == 1


# ---------------------------------------------------------------- batch handlers


def test_batch_handler_gets_at_most_ten_and_retries_only_the_failed_item(dsn: str) -> None:
    app = pgqueue.App()
    batches: list[list[tuple[int, int, int]]] = []

    @app.task(queue="bulk", batch_size=10, max_attempts=3, retry=FAST)
    def send(jobs: list[pgqueue.Job]) -> dict[int, BaseException]:
        batches.append([(job.id, job.args["n"], job.attempt) for job in jobs])
        failures: dict[int, BaseException] = {}
        for job in jobs:
            if job.args.get("flaky") and job.attempt == 1:
                failures[job.id] = RuntimeError("the API rejected this item")
            if job.args.get("poison"):
                failures[job.id] = pgqueue.NonRetryable("this item can never work")
        return failures

    with psycopg.connect(dsn) as conn:
        ids = pgqueue.enqueue_many(
            conn,
            [
                pgqueue.JobSpec("send", {"n": n, "flaky": n == 7, "poison": n == 20})
                for n in range(35)
            ],
            queue="bulk",
        )
        conn.commit()
    with running_worker(app, dsn, concurrency=16, poll_seconds=0.05) as worker:
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM pgqueue.jobs") == 0)
    assert all(1 <= len(batch) <= 10 for batch in batches), [len(b) for b in batches]
    assert max(len(batch) for batch in batches) == 10, "jobs were handed over in bulk"
    attempts: dict[int, list[int]] = defaultdict(list)
    for batch in batches:
        for _, n, attempt in batch:
            attempts[n].append(attempt)
    assert attempts[7] == [1, 2], "the failed item was retried"
    assert all(attempts[n] == [1] for n in range(35) if n != 7), "the others ran once"
    assert rows(dsn, "SELECT id, reason FROM pgqueue.dead_jobs") == [(ids[20], "non_retryable")]
    assert (worker.stats.completed, worker.stats.retried, worker.stats.failed) == (34, 1, 1)
