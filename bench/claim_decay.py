"""How a claim's cost grows through one long drain: claim and ack of 1,000 jobs at a time.

    bench/.venv/bin/python bench/claim_decay.py [--jobs 1000000] [--pg 18] [--no-hints]

One connection enqueues ``--jobs`` no-op jobs, then claims 1,000 and acks them, again and
again, as fast as it can (no worker, no handler). It prints the median time of a claim and of
an ack in the first, middle and last hundred batches: growth there is the price of the index
entries the drain leaves behind until vacuum runs. Claims carry the worker's hint (where the
last full batch ended, see pgqueue/claims.py) unless ``--no-hints`` is given.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import psycopg
from server import PostgresServer

import pgqueue
from pgqueue import db, migrate
from pgqueue.claims import ClaimHints, hint_params

BATCH = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description="claim and ack cost through one long drain")
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--pg", type=int, default=18)
    parser.add_argument("--no-hints", action="store_true", help="every claim scans from the start")
    args = parser.parse_args()
    with PostgresServer(major=args.pg) as server:
        dsn = server.create_database("bench_decay")
        migrate.upgrade(dsn)
        queries = db.queries("pgqueue")
        params = {
            "queue": "bench",
            "limit": BATCH,
            "worker_id": uuid.uuid4(),
            "lease_seconds": 30.0,
            "task_names": ["noop"],
            "task_max_attempts": [3],
            "default_max_attempts": 3,
            "durable": False,
        }
        hints = ClaimHints(0.0 if args.no_hints else 1.0)
        with psycopg.connect(dsn, autocommit=True) as conn:
            with conn.transaction():
                pgqueue.enqueue_many(
                    conn, [("noop", {"i": i}) for i in range(args.jobs)], queue="bench"
                )
            claims: list[float] = []
            acks: list[float] = []
            for _ in range(args.jobs // BATCH):
                hint = hints.get("bench")
                params.update(hint_params(hint))
                began = time.perf_counter()
                rows = conn.execute(queries["claim_jobs"].text, params, prepare=True).fetchall()  # type: ignore[arg-type]
                hints.record("bench", rows, BATCH, hint)
                claimed = time.perf_counter()
                ack = {"ids": [row[0] for row in rows], "tokens": [row[9] for row in rows]}
                conn.execute(queries["complete_jobs"].text, ack, prepare=True).fetchall()  # type: ignore[arg-type]
                claims.append(claimed - began)
                acks.append(time.perf_counter() - claimed)
        count = len(claims)
        for name, start in (
            ("first", 0),
            ("middle", max(0, count // 2 - 50)),
            ("last", max(0, count - 100)),
        ):
            claim = statistics.median(claims[start : start + 100]) * 1000
            ack_ms = statistics.median(acks[start : start + 100]) * 1000
            print(f"{name} 100 batches: claim {claim:.2f} ms, ack {ack_ms:.2f} ms per {BATCH} jobs")


if __name__ == "__main__":
    main()
