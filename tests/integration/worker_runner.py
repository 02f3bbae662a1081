"""Run a real Worker on a thread inside a test, against the test's database."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

import pgqueue


@contextmanager
def running_worker(app: pgqueue.App, dsn: str, **settings: Any) -> Iterator[pgqueue.Worker]:
    options: dict[str, Any] = {"concurrency": 4, "lease_seconds": 5.0, "poll_seconds": 0.2}
    options.update(settings)
    queues = options.pop("queues", None)
    worker = pgqueue.Worker(app, dsn, queues=queues, settings=pgqueue.WorkerSettings(**options))
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.request_stop()
        thread.join(60)
        assert not thread.is_alive(), "worker did not stop"


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def scalar(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def enqueue(dsn: str, task: str, args: dict[str, Any] | None = None, **options: Any) -> int:
    with psycopg.connect(dsn) as conn:
        job_id = pgqueue.enqueue(conn, task, args or {}, **options)
        conn.commit()
    return job_id


def jobs_left(dsn: str) -> int:
    return int(scalar(dsn, "SELECT count(*) FROM pgqueue.jobs"))
