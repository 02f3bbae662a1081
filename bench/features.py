"""The cost of flow-control features on the drain rate, measured side by side in one run.

    bench/.venv/bin/python bench/features.py [--jobs 50000] [--repeat 3]

Each variant bulk-enqueues the same no-op jobs into a fresh database and times one worker
process draining them (async handler, the same settings for every variant):

- plain: no flow control;
- ordering keys: 1,000 keys (50 jobs per key run one at a time, in order);
- unique keys: every job has its own unique key;
- concurrency limit: a global limit of 10,000 (never reached, but every claim takes the
  queue-row lock and counts running jobs);
- rate limit: 1,000,000 jobs per second (never reached; the token bucket is updated on
  every claim);
- job events: the optional per-job state history switched on.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics

import psycopg
from noop_drain import drain
from server import PostgresServer

import pgqueue
from pgqueue import migrate

VARIANTS = (
    "plain",
    "ordering_keys",
    "unique_keys",
    "concurrency_limit",
    "rate_limit",
    "job_events",
)
EVENTS_SQL = """
CREATE TRIGGER job_events_insert AFTER INSERT ON pgqueue.jobs REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgqueue.record_job_events();
CREATE TRIGGER job_events_update AFTER UPDATE ON pgqueue.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgqueue.record_job_events();
CREATE TRIGGER job_events_delete AFTER DELETE ON pgqueue.jobs REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgqueue.record_job_events();
"""


def _worker(dsn: str, total: int, started: object, finished: object) -> None:
    began, ended = drain(dsn, total)
    started.value = began  # type: ignore[attr-defined]
    finished.value = ended  # type: ignore[attr-defined]


def measure(server: PostgresServer, variant: str, jobs: int, attempt: int) -> float:
    dsn = server.create_database(f"features_{variant}_{attempt}")
    migrate.upgrade(dsn)
    with psycopg.connect(dsn) as conn:
        if variant == "concurrency_limit":
            pgqueue.configure_queue(conn, "bench", concurrency_limit=10_000)
        if variant == "rate_limit":
            pgqueue.configure_queue(conn, "bench", rate_limit=(1_000_000, 1.0))
        if variant == "job_events":
            conn.execute(EVENTS_SQL)
        specs = [
            pgqueue.JobSpec(
                "noop",
                {"i": i},
                ordering_key=f"key-{i % 1000}" if variant == "ordering_keys" else None,
                unique_key=f"job-{i}" if variant == "unique_keys" else None,
            )
            for i in range(jobs)
        ]
        pgqueue.enqueue_many(conn, specs, queue="bench")
        conn.commit()
    context = multiprocessing.get_context("spawn")
    started, finished = context.Value("d", 0.0), context.Value("d", 0.0)
    process = context.Process(target=_worker, args=(dsn, jobs, started, finished))
    process.start()
    process.join(600)
    return jobs / (finished.value - started.value)


def main() -> None:
    parser = argparse.ArgumentParser(description="flow-control cost on the drain rate")
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pg", type=int, default=18)
    options = parser.parse_args()
    rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    with PostgresServer(major=options.pg) as server:
        for attempt in range(options.repeat):
            for variant in VARIANTS:  # interleaved, so machine noise hits every variant
                rates[variant].append(measure(server, variant, options.jobs, attempt))
    plain = statistics.median(rates["plain"])
    for variant in VARIANTS:
        values = rates[variant]
        median = statistics.median(values)
        print(
            f"variant={variant} drain_jobs_per_s={median:,.0f} "
            f"range={min(values):,.0f}-{max(values):,.0f} vs_plain={median / plain:.2f}"
        )


if __name__ == "__main__":
    main()
