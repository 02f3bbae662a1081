"""pgqueue itself, installed editable from the repository root (``pip install -e ..``).

Leases, fencing, retries and dead-lettering stay on: the worker below is the stock
``pgqueue.Worker`` with an async no-op task; only its concurrency and batch size are tuned.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

import psycopg

import pgqueue
from pgqueue import migrate
from pgqueue.lifecycle import run_event_loop
from systems import Payload, WorkerSpec, run_until_stopped, tunable

QUEUE = "bench"
CONCURRENCY = {
    1: tunable("pgqueue_concurrency_1", 2000),
    2: tunable("pgqueue_concurrency_2", 1000),
}
BATCH = tunable("pgqueue_batch", 1000)
# pgqueue's default: a claim of plain jobs does not wait for its flush (README, "The
# contract"); BENCH_PGQUEUE_DURABLE_CLAIMS=1 makes every claim wait, as the others' do.
DURABLE_CLAIMS = bool(tunable("pgqueue_durable_claims", 0))
# pgqueue's default: uvloop when installed (it is, in bench/.venv). BENCH_PGQUEUE_EVENT_LOOP=
# asyncio keeps the standard loop.
EVENT_LOOP = os.environ.get("BENCH_PGQUEUE_EVENT_LOOP", "auto")


class PgQueueProducer:
    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(dsn)
        # A job that is its own transaction: on an autocommit connection enqueue() is one
        # statement and one round trip, as the peers' single-job enqueue is.
        self._single = psycopg.connect(dsn, autocommit=True)

    async def enqueue_bulk(self, payloads: Sequence[Payload]) -> None:
        with self._conn.transaction():
            pgqueue.enqueue_many(self._conn, [("noop", p) for p in payloads], queue=QUEUE)

    async def enqueue_one(self, payload: Payload) -> None:
        pgqueue.enqueue(self._single, "noop", payload, queue=QUEUE)

    async def aclose(self) -> None:
        self._conn.close()
        self._single.close()


class PgQueueSystem:
    name = "pgqueue"

    def settings(self, processes: int) -> dict[str, object]:
        return {
            "concurrency": CONCURRENCY[processes],
            "batch_size": BATCH,
            "handler": "async def",
            "lease_seconds": 30,
            "listen": True,
            "retries": "on (default policy)",
            "durable_claims": DURABLE_CLAIMS,
            "event_loop": EVENT_LOOP,
        }

    async def install(self, dsn: str) -> None:
        await asyncio.to_thread(migrate.upgrade, dsn)

    async def open_producer(self, dsn: str) -> PgQueueProducer:
        return PgQueueProducer(dsn)

    def run_worker(self, spec: WorkerSpec) -> None:
        app = pgqueue.App()
        handle = spec.handle

        @app.task(queue=QUEUE)
        async def noop(job: pgqueue.Job, **payload: Any) -> None:
            handle(payload)

        settings = pgqueue.WorkerSettings(
            concurrency=CONCURRENCY[spec.processes],
            batch_size=BATCH,
            lease_seconds=30,
            durable_claims=DURABLE_CLAIMS,
            event_loop=EVENT_LOOP,
        )
        worker = pgqueue.Worker(app, spec.dsn, queues=[QUEUE], settings=settings)

        async def main() -> None:
            run = asyncio.create_task(worker.run_async())
            await run_until_stopped(spec.stop)
            worker.request_stop()
            await run

        run_event_loop(main(), EVENT_LOOP)


def create() -> PgQueueSystem:
    return PgQueueSystem()
