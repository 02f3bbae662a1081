"""Helpers for fault tests: real `pgqueue worker` processes, a ledger, and waiting on events.

Fixtures: ``workers`` (starts worker processes running tests/apps/fault_app.py against ``dsn``
and kills whatever is left at teardown) and ``ledger`` (creates the ledger table and reads
the database). ``wait_until`` polls a predicate against a deadline instead of sleeping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.apps import fault_app

REPO_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float, message: str, interval: float = 0.05
) -> T:
    """Return the first truthy ``predicate()``; fail naming ``message`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


class WorkerProcess:
    """One `pgqueue worker` subprocess; its stderr (the log) goes to a file the test can read."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log_file = open(log_path, "wb")  # closed in reap()
        self.popen = subprocess.Popen(
            args, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=self._log_file
        )
        self.pid = self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        """The exit code; fails the test (with the log) if the process is still running."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGUSR1)  # fault_app dumps every thread's stack
            os.kill(self.pid, signal.SIGUSR2)  # and every asyncio task's
            time.sleep(0.5)
            raise AssertionError(
                f"worker {self.pid} still running {timeout:g}s later; its log:\n{self.log()}"
            ) from None

    def reap(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGCONT)  # a stopped process must not outlive the test
            self.popen.kill()
            self.popen.wait(10)
        self._log_file.close()


class Workers:
    """Starts worker processes for one test's database and cleans up after them."""

    def __init__(self, dsn: str, log_dir: Path) -> None:
        self.dsn = dsn
        self.log_dir = log_dir
        self.started: list[WorkerProcess] = []

    def start(
        self,
        *,
        lease_seconds: float = 2.0,
        shutdown_grace: float = 5.0,
        concurrency: int = 2,
        poll_seconds: float = 0.2,
        wait_ready: bool = True,
    ) -> WorkerProcess:
        args = [
            sys.executable, "-m", "pgqueue.cli.main", "worker",
            "--app", "tests.apps.fault_app:app",
            "--queue", fault_app.QUEUE,
            "--concurrency", str(concurrency),
            "--lease-seconds", str(lease_seconds),
            "--shutdown-grace", str(shutdown_grace),
            "--poll-seconds", str(poll_seconds),
        ]  # fmt: skip
        env = {**os.environ, "PGQUEUE_DSN": self.dsn, "PYTHONUNBUFFERED": "1"}
        env.pop("DATABASE_URL", None)
        log_path = self.log_dir / f"worker-{len(self.started)}.log"
        worker = WorkerProcess(args, env, log_path)
        self.started.append(worker)
        if wait_ready:
            wait_until(
                lambda: "started: queues=" in worker.log() or not worker.is_alive(),
                20,
                f"worker {worker.pid} to start",
            )
            # It may be gone already: a job that kills its worker can be claimed at once.
            assert "started: queues=" in worker.log(), f"worker failed to start:\n{worker.log()}"
        return worker

    def close(self) -> None:
        for worker in self.started:
            worker.reap()


class Ledger:
    """Reads (and creates) the ledger and pgqueue's tables of the test database."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
        self.conn.execute(fault_app.LEDGER_DDL)

    def query(self, statement: str, params: Any = None) -> list[dict[str, Any]]:
        return self.conn.execute(statement, params).fetchall()

    def one(self, statement: str, params: Any = None) -> dict[str, Any] | None:
        rows = self.query(statement, params)
        assert len(rows) <= 1, rows
        return rows[0] if rows else None

    def events(self, job_id: int, event: str | None = None) -> list[dict[str, Any]]:
        return self.query(
            "SELECT attempt, worker_pid, event, at FROM ledger"
            " WHERE job_id = %s AND (%s::text IS NULL OR event = %s) ORDER BY at",
            [job_id, event, event],
        )

    def job(self, job_id: int) -> dict[str, Any] | None:
        return self.one("SELECT * FROM pgqueue.jobs WHERE id = %s", [job_id])

    def dead(self, job_id: int) -> dict[str, Any] | None:
        return self.one("SELECT * FROM pgqueue.dead_jobs WHERE id = %s", [job_id])

    def dead_count(self) -> int:
        row = self.one("SELECT count(*) AS n FROM pgqueue.dead_jobs")
        assert row is not None
        return int(row["n"])

    def now(self) -> Any:
        row = self.one("SELECT clock_timestamp() AS now")
        assert row is not None
        return row["now"]

    def enqueue(self, max_attempts: int | None = None, **args: Any) -> int:
        (job_id,) = self.enqueue_together(1, max_attempts, **args)
        return job_id

    def enqueue_together(
        self, count: int, max_attempts: int | None = None, **args: Any
    ) -> list[int]:
        """``count`` identical jobs in one transaction: one wake-up, so one claim takes them all."""
        task = fault_app.work
        if max_attempts is not None:
            task = task.options(max_attempts=max_attempts)
        with psycopg.connect(self.dsn) as conn:  # committed when the block ends
            return [task.enqueue(conn, **args) for _ in range(count)]

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def ledger(dsn: str) -> Iterator[Ledger]:
    reader = Ledger(dsn)
    yield reader
    reader.close()


@pytest.fixture
def workers(dsn: str, tmp_path: Path) -> Iterator[Workers]:
    started = Workers(dsn, tmp_path)
    yield started
    started.close()
