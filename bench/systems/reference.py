"""A minimal plain-SQL queue written for the benchmark: the ceiling Python reaches on this machine.

COPY for bulk enqueue; a batch claim with ``FOR UPDATE SKIP LOCKED`` that marks a lease (token,
expiry, attempt count); the acknowledgement is a batched, token-fenced DELETE that rides in the
same statement as the next claim, so one round trip and one commit serve a whole batch. One
payload-free NOTIFY per enqueue transaction wakes idle workers; a poll is the backstop. No
retries, no dead letters, no rescue of expired leases: what a real queue must add costs on top.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from systems import Payload, WorkerSpec, run_until_stopped, tunable

# Connections claiming side by side in one worker process, by number of worker processes.
CLAIM_LOOPS = {1: tunable("reference_loops_1", 4), 2: tunable("reference_loops_2", 2)}
BATCH_SIZE = tunable("reference_batch", 1000)
POLL_S = 1.0
LEASE_S = 30
CHANNEL = "reference_jobs"

SCHEMA = """
CREATE TABLE reference_jobs (
    id bigint GENERATED ALWAYS AS IDENTITY CONSTRAINT reference_jobs_pkey PRIMARY KEY,
    payload jsonb NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    lease_token bigint,
    lease_expires_at timestamptz
)
"""

# -- name: ack_and_claim
# Delete the previous batch (fenced by its lease token) and lease the next one, in one statement.
# The claim reads the snapshot from before the delete; the rows it deletes are leased, so the
# lease filter already excludes them. "= ANY(ARRAY(subquery))" pins the update to primary-key
# lookups: with no statistics (right after a bulk COPY) a join to "picked" is planned as a
# hash join over a sequential scan of the whole table, ~75 ms per claim at 50,000 rows.
ACK_AND_CLAIM = """
WITH acked AS (
    DELETE FROM reference_jobs
    WHERE id = ANY(%(ack_ids)s) AND lease_token = %(ack_token)s
),
picked AS (
    SELECT id FROM reference_jobs
    WHERE lease_expires_at IS NULL OR lease_expires_at < now()
    ORDER BY id
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
UPDATE reference_jobs AS job
SET lease_token = %(token)s,
    lease_expires_at = now() + make_interval(secs => %(lease_s)s),
    attempts = job.attempts + 1
WHERE job.id = ANY(ARRAY(SELECT id FROM picked))
RETURNING job.id, job.payload
"""

ENQUEUE_ONE = f"""
WITH job AS (INSERT INTO reference_jobs (payload) VALUES (%s) RETURNING id)
SELECT pg_notify('{CHANNEL}', '') FROM job
"""

ACK = "DELETE FROM reference_jobs WHERE id = ANY(%(ack_ids)s) AND lease_token = %(ack_token)s"


class ReferenceProducer:
    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def enqueue_bulk(self, payloads: Sequence[Payload]) -> None:
        async with self.conn.transaction():
            cursor = self.conn.cursor()
            async with cursor.copy("COPY reference_jobs (payload) FROM STDIN") as copy:
                for payload in payloads:
                    await copy.write_row((Jsonb(payload),))
            await self.conn.execute(f"NOTIFY {CHANNEL}")

    async def enqueue_one(self, payload: Payload) -> None:
        # One statement in autocommit: one round trip, one transaction, insert and wake-up.
        await self.conn.execute(ENQUEUE_ONE, (Jsonb(payload),))

    async def aclose(self) -> None:
        await self.conn.close()


class ReferenceQueue:
    name = "reference"

    def settings(self, processes: int) -> dict[str, object]:
        return {
            "driver": f"psycopg {psycopg.__version__} (async, prepared statements)",
            "claim_loops_per_process": CLAIM_LOOPS.get(processes, 2),
            "batch_size": BATCH_SIZE,
            "wake_up": f"LISTEN/NOTIFY, poll every {POLL_S} s",
            "lease_s": LEASE_S,
            "processes": processes,
        }

    async def install(self, dsn: str) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(SCHEMA)

    async def open_producer(self, dsn: str) -> ReferenceProducer:
        return ReferenceProducer(await psycopg.AsyncConnection.connect(dsn, autocommit=True))

    def run_worker(self, spec: WorkerSpec) -> None:
        asyncio.run(self._work(spec))

    async def _work(self, spec: WorkerSpec) -> None:
        wake = asyncio.Event()
        listener = asyncio.create_task(self._listen(spec.dsn, wake))
        loops = [
            asyncio.create_task(self._claim_loop(spec, wake))
            for _ in range(CLAIM_LOOPS.get(spec.processes, 2))
        ]
        await run_until_stopped(spec.stop)
        wake.set()
        await asyncio.gather(*loops)
        listener.cancel()

    async def _listen(self, dsn: str, wake: asyncio.Event) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            async for _ in conn.notifies():
                wake.set()

    async def _claim_loop(self, spec: WorkerSpec, wake: asyncio.Event) -> None:
        async with await psycopg.AsyncConnection.connect(
            spec.dsn, autocommit=True, prepare_threshold=0
        ) as conn:
            ack_ids: list[int] = []
            ack_token = 0
            while not spec.stop.is_set():
                # Cleared before the claim, so a NOTIFY that lands while it runs is not lost.
                wake.clear()
                token = random.getrandbits(63)
                params = {
                    "ack_ids": ack_ids,
                    "ack_token": ack_token,
                    "batch": BATCH_SIZE,
                    "token": token,
                    "lease_s": LEASE_S,
                }
                rows = await (await conn.execute(ACK_AND_CLAIM, params)).fetchall()
                ack_ids, ack_token = [row[0] for row in rows], token
                for _, payload in rows:
                    spec.handle(payload)
                if not rows:
                    try:
                        await asyncio.wait_for(wake.wait(), POLL_S)
                    except asyncio.TimeoutError:
                        pass
            if ack_ids:
                await conn.execute(ACK, {"ack_ids": ack_ids, "ack_token": ack_token})


def create() -> ReferenceQueue:
    return ReferenceQueue()
