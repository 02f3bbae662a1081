"""PgQueuer (latest release) in its documented fast setup: asyncpg, uvloop, batched dequeue.

Settings follow PgQueuer's own docs: its benchmark tool (asyncpg driver, several QueueManagers
each on its own connection, uvloop), the performance-tuning guide (raise ``batch_size`` for
short jobs, one dedicated asyncpg connection per QueueManager, ``pgq autovac`` table settings)
and the default "durable" durability (every table logged, as for the other systems). The
numbers of managers and the batch size were picked by a sweep on this 2-core machine (README).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import timedelta
from importlib.metadata import version

import asyncpg
import uvloop
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries

from systems import Payload, WorkerSpec, run_until_stopped, tunable

ENTRYPOINT = "noop"
# QueueManagers (one connection each) per worker process, by number of worker processes.
MANAGERS_PER_PROCESS = {1: tunable("pgqueuer_managers_1", 2), 2: tunable("pgqueuer_managers_2", 1)}
BATCH_SIZE = tunable("pgqueuer_batch", 500)
DEQUEUE_TIMEOUT = timedelta(seconds=30)  # polling backstop; NOTIFY wakes idle managers


def _encode(payload: Payload) -> bytes:
    return json.dumps(payload).encode()


class PgQueuerProducer:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.queries = Queries(AsyncpgDriver(conn))

    async def enqueue_bulk(self, payloads: Sequence[Payload]) -> None:
        # One INSERT … SELECT FROM unnest(arrays): a single statement, so a single transaction.
        await self.queries.enqueue(
            [ENTRYPOINT] * len(payloads), [_encode(p) for p in payloads], [0] * len(payloads)
        )

    async def enqueue_one(self, payload: Payload) -> None:
        await self.queries.enqueue(ENTRYPOINT, _encode(payload), 0)

    async def aclose(self) -> None:
        await self.conn.close()


class PgQueuerSystem:
    name = "pgqueuer"

    def settings(self, processes: int) -> dict[str, object]:
        return {
            "version": version("pgqueuer"),
            "driver": f"asyncpg {version('asyncpg')}, one connection per QueueManager",
            "event_loop": "uvloop",
            "queue_managers_per_process": MANAGERS_PER_PROCESS.get(processes, 2),
            "batch_size": BATCH_SIZE,
            "dequeue_timeout_s": DEQUEUE_TIMEOUT.total_seconds(),
            "durability": "durable (default)",
            "autovacuum": "pgq autovac settings applied",
            "handler": "async def entrypoint",
            "processes": processes,
        }

    async def install(self, dsn: str) -> None:
        conn = await asyncpg.connect(_asyncpg_dsn(dsn))
        try:
            queries = Queries(AsyncpgDriver(conn))
            await queries.install()
            await conn.execute(queries.qbe.build_optimize_autovacuum_query())
        finally:
            await conn.close()

    async def open_producer(self, dsn: str) -> PgQueuerProducer:
        return PgQueuerProducer(await asyncpg.connect(_asyncpg_dsn(dsn)))

    def run_worker(self, spec: WorkerSpec) -> None:
        uvloop.run(self._work(spec))

    async def _work(self, spec: WorkerSpec) -> None:
        managers: list[QueueManager] = []
        for _ in range(MANAGERS_PER_PROCESS.get(spec.processes, 2)):
            conn = await asyncpg.connect(_asyncpg_dsn(spec.dsn))
            manager = QueueManager(Queries(AsyncpgDriver(conn)))

            @manager.entrypoint(ENTRYPOINT)
            async def noop(job: Job) -> None:
                spec.handle(json.loads(job.payload or b"{}"))

            managers.append(manager)
        runs = [
            asyncio.create_task(manager.run(batch_size=BATCH_SIZE, dequeue_timeout=DEQUEUE_TIMEOUT))
            for manager in managers
        ]
        await run_until_stopped(spec.stop)
        for manager in managers:
            manager.shutdown.set()
        await asyncio.gather(*runs)


def _asyncpg_dsn(dsn: str) -> str:
    """asyncpg takes URLs, not libpq keyword strings."""
    fields = dict(part.split("=", 1) for part in dsn.split())
    return f"postgresql://{fields['user']}@{fields['host']}:{fields['port']}/{fields['dbname']}"


def create() -> PgQueuerSystem:
    return PgQueuerSystem()
