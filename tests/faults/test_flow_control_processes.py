"""Flow control across several real `pgqueue worker` processes (tests/apps/flow_app.py).

Handlers write their true start and end (the database's ``clock_timestamp()``) to
``flow_ledger`` through their own connection; the tests check ordering, overlap, concurrency
and rates on those intervals, never on what the workers say about themselves.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import pgqueue
from pgqueue.queues import configure_queue
from tests.apps import flow_app
from tests.faults.conftest import WorkerProcess, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]


class FlowWorkers:
    """Starts `pgqueue worker` processes on flow_app for one test; kills leftovers after."""

    def __init__(self, dsn: str, log_dir: Path) -> None:
        self.dsn = dsn
        self.log_dir = log_dir
        self.started: list[WorkerProcess] = []

    def start(
        self,
        queue: str,
        *,
        app: str = "app",
        concurrency: int = 4,
        poll_seconds: float = 0.2,
        lease_seconds: float = 10.0,
    ) -> WorkerProcess:
        args = [
            sys.executable, "-m", "pgqueue.cli.main", "worker",
            "--app", f"tests.apps.flow_app:{app}",
            "--queue", queue,
            "--concurrency", str(concurrency),
            "--lease-seconds", str(lease_seconds),
            "--poll-seconds", str(poll_seconds),
            "--shutdown-grace", "5",
        ]  # fmt: skip
        env = {**os.environ, "PGQUEUE_DSN": self.dsn, "PYTHONUNBUFFERED": "1"}
        env.pop("DATABASE_URL", None)
        worker = WorkerProcess(args, env, self.log_dir / f"worker-{len(self.started)}.log")
        self.started.append(worker)
        return worker

    def start_many(self, count: int, queue: str, **options: Any) -> list[WorkerProcess]:
        started = [self.start(queue, **options) for _ in range(count)]
        for worker in started:
            wait_until(
                lambda w=worker: "started: queues=" in w.log() or not w.is_alive(),
                30,
                f"worker {worker.pid} to start",
            )
            assert worker.is_alive(), f"worker failed to start:\n{worker.log()}"
        return started

    def stop(self, worker: WorkerProcess) -> None:
        worker.send(signal.SIGTERM)
        assert worker.wait(20) == 0, worker.log()

    def close(self) -> None:
        for worker in self.started:
            worker.reap()


class Db:
    """The test database: the ledger, pgqueue's tables, and enqueueing in one transaction."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
        self.conn.execute(flow_app.LEDGER_DDL)

    def query(self, statement: str, params: Any = None) -> list[dict[str, Any]]:
        return self.conn.execute(statement, params).fetchall()

    def value(self, statement: str, params: Any = None) -> Any:
        rows = self.conn.execute(statement, params).fetchall()
        return next(iter(rows[0].values()))

    def ledger(self, queue: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM flow_ledger WHERE queue = %s ORDER BY started_at, id", [queue]
        )

    def finished(self, queue: str) -> int:
        return int(
            self.value(
                "SELECT count(*) FROM flow_ledger WHERE queue = %s AND ended_at IS NOT NULL",
                [queue],
            )
        )

    def left(self, queue: str) -> int:
        return int(self.value("SELECT count(*) FROM pgqueue.jobs WHERE queue = %s", [queue]))

    def configure(self, queue: str, **settings: Any) -> None:
        with psycopg.connect(self.dsn) as conn:
            configure_queue(conn, queue, **settings)

    def enqueue_many(self, jobs: list[pgqueue.JobSpec]) -> list[int]:
        with psycopg.connect(self.dsn) as conn:  # committed when the block ends
            return pgqueue.enqueue_many(conn, jobs)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def db(dsn: str) -> Iterator[Db]:
    reader = Db(dsn)
    yield reader
    reader.close()


@pytest.fixture
def flow_workers(dsn: str, tmp_path: Path) -> Iterator[FlowWorkers]:
    started = FlowWorkers(dsn, tmp_path)
    yield started
    started.close()


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant (an end at t comes before a start at t)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, delta in events:
        open_now += delta
        peak = max(peak, open_now)
    return peak


def test_ordering_keys_run_one_at_a_time_in_enqueue_order_across_three_workers(
    db: Db, flow_workers: FlowWorkers
) -> None:
    keys = [f"account-{n}" for n in range(20)]
    sequence = [key for key in keys for _ in range(50)]
    random.Random(4).shuffle(sequence)
    priorities = random.Random(5)
    next_seq: dict[str, int] = defaultdict(int)
    specs = []
    for key in sequence:
        # Random priorities must not let a later job of a key overtake an earlier one.
        specs.append(
            pgqueue.JobSpec(
                "ordered",
                {"seq": next_seq[key], "sleep_seconds": 0.002},
                queue="ordered",
                ordering_key=key,
                priority=priorities.randint(-5, 5),
                max_attempts=3,
            )
        )
        next_seq[key] += 1
    workers = flow_workers.start_many(3, "ordered", concurrency=8)
    # Ten transactions while the workers run: new jobs land behind heads that are running,
    # finishing or already gone.
    for start in range(0, 1000, 100):
        db.enqueue_many(specs[start : start + 100])

    wait_until(
        lambda: db.finished("ordered") >= 1000 and db.left("ordered") == 0,
        60,
        "1,000 ordered jobs to finish",
        interval=0.2,
    )

    runs = db.ledger("ordered")
    assert len(runs) == 1000, "each job ran exactly once"
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_key[run["ordering_key"]].append(run)
    assert sorted(by_key) == sorted(keys)
    for key, key_runs in by_key.items():
        assert [r["seq"] for r in key_runs] == list(range(50)), f"{key} started out of order"
        for before, after in pairwise(key_runs):
            assert before["ended_at"] <= after["started_at"], (
                f"{key}: seq {after['seq']} started at {after['started_at']} while seq "
                f"{before['seq']} ran until {before['ended_at']}"
            )
    # Different keys did run in parallel, and on every worker.
    assert max_overlap([(r["started_at"], r["ended_at"]) for r in runs]) > 3
    assert {r["worker_pid"] for r in runs} == {w.pid for w in workers}
    assert db.value("SELECT count(*) FROM pgqueue.dead_jobs") == 0
    assert db.value("SELECT count(*) FROM pgqueue.jobs WHERE state = 'waiting'") == 0


def test_global_concurrency_limit_of_three_holds_across_four_workers(
    db: Db, flow_workers: FlowWorkers
) -> None:
    db.configure("limited", concurrency_limit=3)
    db.enqueue_many(
        [pgqueue.JobSpec("limited", {"sleep_seconds": 0.25}, queue="limited") for _ in range(40)]
    )
    workers = flow_workers.start_many(4, "limited", concurrency=3, poll_seconds=0.05)

    wait_until(
        lambda: db.finished("limited") >= 40 and db.left("limited") == 0,
        45,
        "40 limited jobs to finish",
        interval=0.1,
    )

    runs = db.ledger("limited")
    assert len(runs) == 40
    # 12 slots across the workers, 40 jobs waiting: the limit, not a lack of work, held it.
    assert max_overlap([(r["started_at"], r["ended_at"]) for r in runs]) == 3
    assert len({r["worker_pid"] for r in runs}) >= 2, "the limit was shared by several workers"
    assert len(workers) == 4


def test_rate_limit_of_twenty_per_second_holds_for_five_seconds(
    db: Db, flow_workers: FlowWorkers
) -> None:
    rate, seconds = 20, 5.0
    db.configure("rated", rate_limit=(rate, 1.0))
    db.enqueue_many([pgqueue.JobSpec("rated", {}, queue="rated") for _ in range(250)])
    flow_workers.start_many(3, "rated", concurrency=10, poll_seconds=0.05)

    first = wait_until(lambda: db.ledger("rated"), 20, "the first rated job")[0]["started_at"]
    until = first + timedelta(seconds=seconds)
    wait_until(lambda: db.value("SELECT clock_timestamp()") > until, 15, "five seconds")

    starts = [r["started_at"] for r in db.ledger("rated") if r["started_at"] < until]
    in_window = [
        sum(1 for other in starts if start <= other < start + timedelta(seconds=1))
        for start in starts
    ]
    # One interval of slack: a full bucket may go out just before a refilled one.
    assert max(in_window) <= 2 * rate, f"{max(in_window)} starts within one second"
    # The bucket (20) at once, then 20 per second: about 120 in five seconds, never more.
    assert len(starts) <= rate + rate * seconds + 2, f"{len(starts)} starts in {seconds:g}s"
    assert len(starts) >= 0.7 * rate * seconds, f"only {len(starts)} starts: limit too strict"
    after_burst = [s for s in starts if s >= first + timedelta(seconds=1)]
    assert len(after_burst) <= rate * (seconds - 1) + rate / 2, len(after_burst)
    assert db.left("rated") > 0, "work was still waiting: the rate, not the supply, held it"


def test_per_second_cron_with_two_workers_enqueues_each_tick_once(
    db: Db, flow_workers: FlowWorkers
) -> None:
    first, second = flow_workers.start_many(2, "cron", app="cron_app", poll_seconds=0.05)

    def ticks() -> list[dict[str, Any]]:
        return db.query("SELECT * FROM pgqueue.cron_ticks ORDER BY tick_at")

    wait_until(lambda: len(ticks()) >= 3, 20, "three cron ticks")
    # A worker restart must neither repeat a tick nor lose the schedule.
    first.send(signal.SIGKILL)
    first.wait(10)
    third = flow_workers.start_many(1, "cron", app="cron_app", poll_seconds=0.05)[0]
    wait_until(lambda: len(ticks()) >= 7, 20, "seven cron ticks")
    flow_workers.stop(second)
    flow_workers.stop(third)

    recorded = ticks()
    assert {t["name"] for t in recorded} == {"every_second"}
    tick_times = [t["tick_at"] for t in recorded]
    assert all(t.microsecond == 0 for t in tick_times)
    gaps = {(b - a).total_seconds() for a, b in pairwise(tick_times)}
    assert gaps == {1.0}, f"ticks were skipped or repeated: {tick_times}"
    job_ids = [t["job_id"] for t in recorded]
    assert None not in job_ids and len(set(job_ids)) == len(job_ids)

    # Every job the scheduler made, run or still queued, carries a distinct tick.
    ran = db.query("SELECT job_id, tick FROM flow_ledger WHERE queue = 'cron'")
    queued = db.query(
        "SELECT id AS job_id, headers->>'pgqueue-cron-tick' AS tick FROM pgqueue.jobs"
        " WHERE queue = 'cron'"
    )
    made: dict[int, datetime] = {}
    for row in ran + queued:  # a job in flight on the killed worker may have run twice
        tick = datetime.fromisoformat(row["tick"])
        assert made.setdefault(row["job_id"], tick) == tick
    assert sorted(made) == sorted(job_ids), "one job per tick, no more"
    assert sorted(made.values()) == tick_times
    assert len(ran) >= 5, "the cron jobs ran"
