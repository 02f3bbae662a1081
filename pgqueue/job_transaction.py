"""``job.transaction()``: the handler's own writes commit with the job's acknowledgement."""

from __future__ import annotations

import asyncio
import queue
import uuid
from typing import Any

from pgqueue import db
from pgqueue.errors import LeaseLost
from pgqueue.job import Job


class TransactionSessions:
    """The sessions ``job.transaction()`` borrows, kept for reuse: sync ones for handlers on
    threads (a thread-safe queue), async ones for handlers on the event loop."""

    def __init__(self, dsn: str, schema: str) -> None:
        self._dsn = dsn
        self.complete = db.queries(schema)["complete_job_in_transaction"]
        self._sync: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._async: list[Any] = []

    def take_sync(self) -> Any:
        try:
            return self._sync.get_nowait()
        except queue.Empty:
            return db.connect(self._dsn, "worker-tx", autocommit=False)

    def give_back_sync(self, conn: Any) -> None:
        self._sync.put(conn)

    async def take_async(self) -> Any:
        if self._async:
            return self._async.pop()
        return await db.connect_async(self._dsn, "worker-tx", autocommit=False)

    def give_back_async(self, conn: Any) -> None:
        self._async.append(conn)

    async def close(self) -> None:
        while not self._sync.empty():
            conn = self._sync.get_nowait()
            await asyncio.to_thread(conn.close)
        for conn in self._async:
            await conn.close()
        self._async.clear()


class JobTransaction:
    """``with``/``async with``: a transaction that also acknowledges the job (fenced)."""

    def __init__(
        self, sessions: TransactionSessions, job: Job, leases: dict[int, uuid.UUID]
    ) -> None:
        self._sessions = sessions
        self._job = job
        self._leases = leases
        self._conn: Any = None

    def _params(self) -> dict[str, Any]:
        return {"id": self._job.id, "token": self._job.lease_token}

    def __enter__(self) -> Any:
        self._conn = self._sessions.take_sync()
        return self._conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        conn = self._conn
        try:
            if exc_type is not None:
                conn.rollback()
                return
            rows = db.run_sync(conn, self._sessions.complete, self._params())
            if not rows:
                conn.rollback()
                raise LeaseLost(
                    f"job {self._job.id}: lease lost before job.transaction() committed; "
                    "its writes were rolled back"
                )
            conn.commit()
            self._job.is_acknowledged = True
            # Acked: stop renewing the lease, or the heartbeat would report it lost.
            self._leases.pop(self._job.id, None)
        finally:
            if conn.closed or conn.info.transaction_status != 0:
                conn.close()
            else:
                self._sessions.give_back_sync(conn)

    async def __aenter__(self) -> Any:
        self._conn = await self._sessions.take_async()
        return self._conn

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        conn = self._conn
        try:
            if exc_type is not None:
                await conn.rollback()
                return
            rows = await db.run_async(conn, self._sessions.complete, self._params())
            if not rows:
                await conn.rollback()
                raise LeaseLost(
                    f"job {self._job.id}: lease lost before job.transaction() committed; "
                    "its writes were rolled back"
                )
            await conn.commit()
            self._job.is_acknowledged = True
            # Acked: stop renewing the lease, or the heartbeat would report it lost.
            self._leases.pop(self._job.id, None)
        finally:
            if conn.closed or conn.info.transaction_status != 0:
                await conn.close()
            else:
                self._sessions.give_back_async(conn)
