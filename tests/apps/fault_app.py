"""The app the fault tests run in real `pgqueue worker` processes.

Its one task takes its behaviour from the job's arguments and writes what it really did to a
``ledger`` table (which the test creates) through its own autocommit connection, so the test
sees every start and end even when the worker's own writes are discarded or never happen.

    pgqueue worker --app tests.apps.fault_app:app --queue faults   # PGQUEUE_DSN must be set
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
import time
from types import FrameType

import psycopg

from pgqueue import App, Job, RetryPolicy

QUEUE = "faults"
LEDGER_DDL = """
CREATE TABLE ledger (
    job_id bigint NOT NULL,
    attempt int NOT NULL,
    worker_pid int NOT NULL,
    event text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

app = App()


def _dump_asyncio_tasks(signum: int, frame: FrameType | None) -> None:
    try:
        tasks = asyncio.all_tasks(asyncio.get_running_loop())
    except RuntimeError:
        return
    for task in tasks:
        task.print_stack(file=sys.stderr)


# `kill -USR1 <pid>` writes every thread's stack to stderr and `kill -USR2 <pid>` every
# asyncio task's: the tests do both to a worker that fails to exit in time, so the failure
# shows where it hangs.
faulthandler.register(signal.SIGUSR1, all_threads=True)
signal.signal(signal.SIGUSR2, _dump_asyncio_tasks)


def record(job: Job, event: str) -> None:
    """Append one ledger row, committed at once, whatever happens to the job afterwards."""
    with psycopg.connect(os.environ["PGQUEUE_DSN"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ledger (job_id, attempt, worker_pid, event) VALUES (%s, %s, %s, %s)",
            [job.id, job.attempt, os.getpid(), event],
        )


@app.task(queue=QUEUE, max_attempts=5, retry=RetryPolicy(base_seconds=0.05, max_seconds=0.2))
def work(
    job: Job,
    sleep_seconds: float = 0.0,
    exit_process: bool = False,
    always_raise: bool = False,
) -> None:
    """Record 'start'; then die, raise, or sleep; record 'end' if it got that far."""
    record(job, "start")
    if exit_process:
        os._exit(1)  # the whole worker process, mid-job: no cleanup, no ack
    if always_raise:
        raise RuntimeError(f"handler always fails (attempt {job.attempt})")
    time.sleep(sleep_seconds)
    record(job, "end")
