"""Single-job enqueue with many producers, against a one-row INSERT per transaction.

    bench/.venv/bin/python bench/producers.py [--producers 8] [--seconds 5] [--repeat 3]

Each producer is a thread with its own connection that commits one transaction per job, as
a web request would. The variants run interleaved in one database, each for ``--seconds``:

- insert: ``INSERT INTO bench_rows (queue, task, args) VALUES (...)``, one row per
  transaction into a table shaped like a job (bigint identity key, text, jsonb, timestamptz):
  what PostgreSQL itself does, the baseline of issue 6;
- insert + NOTIFY: the same with a payload-free ``pg_notify`` (what wakes pgqueue's
  workers): PostgreSQL serializes the commits of notifying transactions;
- enqueue, workers busy: ``pgqueue.enqueue(conn, "noop", {...}, queue="bench")`` in the
  transaction, with the queue's one worker row in ``pgqueue.processes`` marked busy, as a
  worker's is while it drains a backlog (no worker runs): no NOTIFY;
- enqueue, a worker waiting: the same with that row not marked busy, as an idle worker's
  is: every transaction sends a NOTIFY;
- enqueue, scheduled: ``delay=3600`` (workers busy). A job that is not due never sends a
  NOTIFY;
- enqueue + business row: the INSERT and the enqueue in the same transaction (what an
  application does; workers busy), for reference.

Prints transactions per second (median of the repeats, min-max) and enqueue/insert.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from server import PostgresServer

import pgqueue
from pgqueue import migrate

SETUP_SQL = """
CREATE TABLE bench_rows (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    task text NOT NULL,
    args jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""

# A worker's row, marked busy (draining a backlog) or not (waiting for a NOTIFY); no worker
# runs.
WORKER_ROW_SQL = """
INSERT INTO pgqueue.processes (id, kind, host, pid, queues, concurrency, busy_since)
VALUES (gen_random_uuid(), 'worker', 'bench', 0, ARRAY['bench'], 1,
        CASE WHEN %(busy)s THEN now() END)
"""


def _insert(conn: psycopg.Connection[Any], n: int) -> None:
    conn.execute(
        "INSERT INTO bench_rows (queue, task, args) VALUES (%s, %s, %s)",
        ("bench", "noop", Jsonb({"i": n})),
    )


def _insert_notify(conn: psycopg.Connection[Any], n: int) -> None:
    _insert(conn, n)
    conn.execute("SELECT pg_notify('bench', '')")


def _enqueue(conn: psycopg.Connection[Any], n: int) -> None:
    pgqueue.enqueue(conn, "noop", {"i": n}, queue="bench")


def _enqueue_scheduled(conn: psycopg.Connection[Any], n: int) -> None:
    pgqueue.enqueue(conn, "noop", {"i": n}, queue="bench", delay=3600)


def _both(conn: psycopg.Connection[Any], n: int) -> None:
    _insert(conn, n)
    _enqueue(conn, n)


VARIANTS: dict[str, Callable[[psycopg.Connection[Any], int], None]] = {
    "insert": _insert,
    "insert + NOTIFY": _insert_notify,
    "enqueue, workers busy": _enqueue,
    "enqueue, a worker waiting": _enqueue,
    "enqueue, scheduled": _enqueue_scheduled,
    "enqueue + business row": _both,
}


def run_variant(dsn: str, body: Callable[..., None], producers: int, seconds: float) -> float:
    """Transactions per second of ``producers`` threads running ``body`` for ``seconds``."""
    connections = [psycopg.connect(dsn) for _ in range(producers)]
    counts = [0] * producers
    start = threading.Barrier(producers + 1)
    stop = threading.Event()

    def produce(index: int) -> None:
        conn = connections[index]
        start.wait()
        while not stop.is_set():
            with conn.transaction():
                body(conn, counts[index])
            counts[index] += 1

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    for conn in connections:
        conn.close()
    return sum(counts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description="single-job enqueue vs one-row insert")
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pg", type=int, default=18)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with PostgresServer(major=args.pg) as server:
        dsn = server.create_database("bench_producers")
        migrate.upgrade(dsn)
        with psycopg.connect(dsn) as conn:
            conn.execute(SETUP_SQL)
        print(f"PostgreSQL: {server.version.split(',')[0]}; {args.producers} producers")
        for repeat in range(args.repeat):
            for name, body in VARIANTS.items():
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("TRUNCATE bench_rows, pgqueue.jobs, pgqueue.processes")
                    conn.execute(WORKER_ROW_SQL, {"busy": name != "enqueue, a worker waiting"})
                    conn.execute("VACUUM ANALYZE bench_rows, pgqueue.jobs")
                    conn.execute("CHECKPOINT")
                rate = run_variant(dsn, body, args.producers, args.seconds)
                rates[name].append(rate)
                print(f"repeat {repeat + 1} {name:<24} {rate:10,.0f} transactions/s", flush=True)
    print()
    for name, values in rates.items():
        print(
            f"{name:<24} {statistics.median(values):10,.0f} tx/s "
            f"[{min(values):,.0f}-{max(values):,.0f}]"
        )
    ratio = statistics.median(rates["enqueue, workers busy"]) / statistics.median(rates["insert"])
    print(f"ratio enqueue (workers busy)/insert={ratio:.2f}")
    ratio = statistics.median(rates["enqueue, a worker waiting"]) / statistics.median(
        rates["insert"]
    )
    print(f"ratio enqueue with a worker waiting (NOTIFY)/insert={ratio:.2f}")
    ratio = statistics.median(rates["enqueue, scheduled"]) / statistics.median(rates["insert"])
    print(f"ratio scheduled enqueue/insert={ratio:.2f}")


if __name__ == "__main__":
    main()
