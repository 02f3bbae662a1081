"""The apps the flow-control process tests run in real `pgqueue worker` processes.

Every handler writes one row per run to ``flow_ledger`` (which the test creates) through its
own autocommit connection: ``started_at`` when the handler begins and ``ended_at`` when it
returns, both from the database's ``clock_timestamp()``. The tests read true intervals from
there, whatever the worker later writes about the job.

    pgqueue worker --app tests.apps.flow_app:app --queue ordered       # PGQUEUE_DSN must be set
    pgqueue worker --app tests.apps.flow_app:cron_app --queue cron

``cron_app`` is separate so that workers of the other tests run no scheduler.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time
from typing import Any

import psycopg

from pgqueue import App, Job, RetryPolicy

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS flow_ledger (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL,
    queue text NOT NULL,
    ordering_key text,
    seq int,
    attempt int NOT NULL,
    worker_pid int NOT NULL,
    tick text,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at timestamptz
)
"""

FAST_RETRY = RetryPolicy(base_seconds=0.05, max_seconds=0.1)

app = App()
cron_app = App()

# `kill -USR1 <pid>` writes every thread's stack to stderr (for a worker that hangs).
faulthandler.register(signal.SIGUSR1, all_threads=True)

_local = threading.local()


def _ledger() -> psycopg.Connection[Any]:
    """One autocommit connection per handler thread, kept for the life of the process."""
    conn: psycopg.Connection[Any] | None = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg.connect(os.environ["PGQUEUE_DSN"], autocommit=True)
        _local.conn = conn
    return conn


def started(job: Job, seq: int | None = None, tick: str | None = None) -> int:
    row = (
        _ledger()
        .execute(
            "INSERT INTO flow_ledger (job_id, queue, ordering_key, seq, attempt, worker_pid, tick)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
            [job.id, job.queue, job.ordering_key, seq, job.attempt, os.getpid(), tick],
        )
        .fetchone()
    )
    assert row is not None
    return int(row[0])


def ended(row_id: int) -> None:
    _ledger().execute("UPDATE flow_ledger SET ended_at = clock_timestamp() WHERE id = %s", [row_id])


def _run(job: Job, sleep_seconds: float, seq: int | None = None) -> None:
    row_id = started(job, seq=seq)
    time.sleep(sleep_seconds)
    ended(row_id)


@app.task(queue="ordered", max_attempts=3, retry=FAST_RETRY)
def ordered(job: Job, seq: int, sleep_seconds: float = 0.0) -> None:
    """A job of an ordering key; ``seq`` is its place in the key's enqueue order."""
    _run(job, sleep_seconds, seq)


@app.task(queue="limited", max_attempts=3, retry=FAST_RETRY)
def limited(job: Job, sleep_seconds: float = 0.0) -> None:
    """A job of a queue with a global concurrency limit."""
    _run(job, sleep_seconds)


@app.task(queue="rated", max_attempts=3, retry=FAST_RETRY)
def rated(job: Job) -> None:
    """A job of a queue with a rate limit: only its start matters."""
    _run(job, 0.0)


@cron_app.periodic("* * * * * *", queue="cron", max_attempts=3, retry=FAST_RETRY)
def every_second(job: Job) -> None:
    """Enqueued by the scheduler at every second's tick; records which tick it was."""
    ended(started(job, tick=job.headers.get("pgqueue-cron-tick")))
