"""The worker's gateway to its tables: claim, settle, heartbeat and rescue, batched."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from pgqueue import db
from pgqueue.claims import ClaimHint, hint_params
from pgqueue.errors import DatabaseError, SchemaNotReady
from pgqueue.outcome import Outcome

log = logging.getLogger("pgqueue.worker")


@dataclass
class Settlement:
    """Outcomes waiting to be written, grouped by the statement that writes them."""

    complete: list[tuple[int, UUID]] = field(default_factory=list)
    retry: list[tuple[int, UUID, Outcome]] = field(default_factory=list)
    fail: list[tuple[int, UUID, Outcome]] = field(default_factory=list)
    release: list[tuple[int, UUID]] = field(default_factory=list)
    # Outbox only: which sink delivered each completed message.
    sinks: dict[int, str] = field(default_factory=dict)

    def add(self, job_id: int, token: UUID, outcome: Outcome) -> None:
        if outcome.kind == "complete":
            self.complete.append((job_id, token))
        elif outcome.kind in ("retry", "snooze"):
            self.retry.append((job_id, token, outcome))
        elif outcome.kind == "fail":
            self.fail.append((job_id, token, outcome))
        else:
            self.release.append((job_id, token))

    def __len__(self) -> int:
        return len(self.complete) + len(self.retry) + len(self.fail) + len(self.release)

    def merged(self, later: Settlement) -> Settlement:
        """This batch followed by ``later`` (a failed write goes back in front)."""
        merged = Settlement(
            complete=self.complete + later.complete,
            retry=self.retry + later.retry,
            fail=self.fail + later.fail,
            release=self.release + later.release,
        )
        merged.sinks = {**self.sinks, **later.sinks}
        return merged

    def ids(self) -> set[int]:
        found = {i for i, _ in self.complete} | {i for i, _ in self.release}
        return found | {i for i, _, _ in self.retry} | {i for i, _, _ in self.fail}


class Stopping(DatabaseError):
    """Raised instead of reconnecting once a shutdown began and the database is unreachable."""


class Reconnecting:
    """One pgqueue-owned async session that reconnects with jittered, capped backoff."""

    def __init__(self, dsn: str, role: str) -> None:
        self._dsn = dsn
        self._role = role
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._failures = 0
        self.is_stopping = False

    async def get(self) -> psycopg.AsyncConnection[Any]:
        while self._conn is None or self._conn.closed:
            if self.is_stopping and self._failures:
                # Shutting down with the database unreachable: stop trying, the caller's
                # leases expire and any worker rescues the jobs later.
                raise Stopping("stopping: the database is unreachable", is_transient=True)
            try:
                self._conn = await db.connect_async(self._dsn, self._role)
                if self._failures:
                    log.info("database connection restored (%s)", self._role)
                self._failures = 0
            except Exception as exc:
                self._failures += 1
                delay = random.uniform(0, min(30.0, 0.2 * 2 ** min(self._failures, 8)))
                # One line at the first failure and then every tenth: no log flood.
                if self._failures == 1 or self._failures % 10 == 0:
                    log.warning(
                        "cannot connect (%s), attempt %d, next in %.1fs: %s",
                        self._role,
                        self._failures,
                        delay,
                        db.translate_error(exc),
                    )
                await asyncio.sleep(delay)
        return self._conn

    async def discard(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.close()
            except Exception:
                pass
        self._conn = None

    async def close(self) -> None:
        await self.discard()


class JobStore:
    """Async claim and settle on two sessions, so acks never wait behind a claim.

    A claim of plain jobs commits without waiting for its WAL to reach disk (the
    ``claim_jobs`` query says when, and README's "The contract" what a crash can then take
    back); ``durable_claims`` makes every claim wait like any other commit.
    """

    def __init__(self, dsn: str, schema: str, *, durable_claims: bool = False) -> None:
        self._queries = db.queries(schema)
        self._durable_claims = durable_claims
        self._claimer = Reconnecting(dsn, "worker")
        self._settler = Reconnecting(dsn, "worker")

    async def close(self) -> None:
        await self._claimer.close()
        await self._settler.close()

    def stop_retrying(self) -> None:
        """From now on, a session that cannot reconnect fails at once instead of retrying."""
        self._claimer.is_stopping = True
        self._settler.is_stopping = True

    async def _run(
        self, session: Reconnecting, name: str, params: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        conn = await session.get()
        try:
            async with conn.cursor(row_factory=dict_row) as cursor:
                await cursor.execute(self._queries[name].text, params)  # type: ignore[arg-type]
                return await cursor.fetchall() if cursor.description else []
        except psycopg.Error as exc:
            if conn.closed or db.is_connection_error(exc):
                await session.discard()
            raise db.translate_error(exc) from exc

    async def execute(self, name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Run any named query on the claiming session (bookkeeping at start and stop)."""
        return await self._run(self._claimer, name, params)

    async def cron_tick(
        self, name: str, tick_at: Any, enqueue: db.Query, params: Mapping[str, Any]
    ) -> int | None:
        """Record a cron tick and enqueue its job in one transaction; None if taken."""
        conn = await self._claimer.get()
        try:
            async with conn.transaction():
                async with conn.cursor(row_factory=dict_row) as cursor:
                    tick = {"name": name, "tick_at": tick_at}
                    await cursor.execute(self._queries["record_cron_tick"].text, tick)  # type: ignore[arg-type]
                    if not await cursor.fetchall():
                        return None
                    await cursor.execute(enqueue.text, params)  # type: ignore[arg-type]
                    job_id = int((await cursor.fetchall())[0]["job_id"])
                    await cursor.execute(
                        self._queries["set_cron_tick_job"].text,  # type: ignore[arg-type]
                        {**tick, "job_id": job_id},
                    )
                    return job_id
        except psycopg.Error as exc:
            if conn.closed or db.is_connection_error(exc):
                await self._claimer.discard()
            raise db.translate_error(exc) from exc

    async def claim(
        self,
        queue: str,
        limit: int,
        *,
        worker_id: UUID,
        lease_seconds: float,
        task_max_attempts: Mapping[str, int],
        default_max_attempts: int,
        hint: ClaimHint | None = None,
    ) -> list[tuple[Any, ...]]:
        """Claimed rows as tuples in ``claim_jobs`` column order (the hot path: no dicts).

        ``hint`` is where this worker's last full batch of ``queue`` ended (see ClaimHints).
        """
        params = {
            "queue": queue,
            "limit": limit,
            "worker_id": worker_id,
            "lease_seconds": lease_seconds,
            "task_names": list(task_max_attempts),
            "task_max_attempts": list(task_max_attempts.values()),
            "default_max_attempts": default_max_attempts,
            **hint_params(hint),
            "durable": self._durable_claims,
        }
        conn = await self._claimer.get()
        try:
            async with conn.cursor() as cursor:
                await cursor.execute(self._queries["claim_jobs"].text, params)  # type: ignore[arg-type]
                return await cursor.fetchall()
        except psycopg.Error as exc:
            if conn.closed or db.is_connection_error(exc):
                await self._claimer.discard()
            raise db.translate_error(exc) from exc

    async def settle(self, batch: Settlement) -> set[int]:
        """Write every outcome of ``batch``; return the ids whose lease still held."""
        conn = await self._settler.get()
        written: set[int] = set()
        try:
            # Pipeline mode: the statements travel together, one round trip for all.
            async with conn.pipeline():
                cursors = []
                for name, params in self._statements(batch):
                    cursor = conn.cursor()
                    await cursor.execute(self._queries[name].text, params)  # type: ignore[arg-type]
                    cursors.append((name, cursor))
            for name, cursor in cursors:
                self._read_settled(name, await cursor.fetchall(), written)
        except psycopg.Error as exc:
            if conn.closed or db.is_connection_error(exc):
                await self._settler.discard()
            raise db.translate_error(exc) from exc
        return written

    def _read_settled(self, name: str, rows: list[tuple[Any, ...]], written: set[int]) -> None:
        # Every settle statement returns the id of each row it wrote as its first column.
        written.update(row[0] for row in rows)

    def _statements(self, batch: Settlement) -> Sequence[tuple[str, dict[str, Any]]]:
        statements: list[tuple[str, dict[str, Any]]] = []
        if batch.complete:
            ids, tokens = zip(*batch.complete, strict=False)
            statements.append(("complete_jobs", {"ids": list(ids), "tokens": list(tokens)}))
        if batch.retry:
            statements.append(
                (
                    "retry_jobs",
                    {
                        "ids": [i for i, _, _ in batch.retry],
                        "tokens": [t for _, t, _ in batch.retry],
                        "delays": [o.delay_seconds for _, _, o in batch.retry],
                        "errors": [o.error for _, _, o in batch.retry],
                        "snoozes": [o.kind == "snooze" for _, _, o in batch.retry],
                    },
                )
            )
        if batch.fail:
            statements.append(
                (
                    "fail_jobs",
                    {
                        "ids": [i for i, _, _ in batch.fail],
                        "tokens": [t for _, t, _ in batch.fail],
                        "reasons": [o.reason for _, _, o in batch.fail],
                        "errors": [o.error for _, _, o in batch.fail],
                        "block_keys": [o.blocks_key for _, _, o in batch.fail],
                    },
                )
            )
        if batch.release:
            ids, tokens = zip(*batch.release, strict=False)
            statements.append(("release_jobs", {"ids": list(ids), "tokens": list(tokens)}))
        return statements


class MaintenanceSession:
    """A sync session for the heartbeat thread: leases, liveness and rescue."""

    def __init__(self, dsn: str, schema: str) -> None:
        self._dsn = dsn
        self._queries = db.queries(schema)
        self._conn: psycopg.Connection[Any] | None = None

    def run(self, name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self._dsn, "worker-heartbeat")
        try:
            with self._conn.cursor(row_factory=dict_row) as cursor:
                cursor.execute(self._queries[name].text, params)  # type: ignore[arg-type]
                return cursor.fetchall() if cursor.description else []
        except psycopg.Error as exc:
            if self._conn.closed or db.is_connection_error(exc):
                self.close()
            raise db.translate_error(exc) from exc

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None


# The columns of a message row, as claim_messages and complete_messages return them.
MESSAGE_COLUMNS = (
    "id",
    "lease_token",
    "message_id",
    "topic",
    "key",
    "payload",
    "headers",
    "attempts",
    "created_at",
)


class MessageStore(JobStore):
    """The relay's twin of :class:`JobStore`: the same sessions, the outbox statements.

    Handoff: while ``handoff`` is set to (relay id, lease seconds), the write that settles
    a delivered keyed message may also lease that key's next message to the relay (see
    migration 0006); :meth:`take_handed_over` returns those rows, in the order written.
    """

    def __init__(self, dsn: str, schema: str, *, keep_history: bool) -> None:
        super().__init__(dsn, schema)
        self._keep_history = keep_history
        self.handoff: tuple[UUID, float] | None = None
        self._handed_over: list[dict[str, Any]] = []

    def stop_retrying(self) -> None:
        """Shutdown began: also stop taking messages in settle writes."""
        super().stop_retrying()
        self.handoff = None

    def take_handed_over(self) -> list[dict[str, Any]]:
        rows, self._handed_over = self._handed_over, []
        return rows

    def _read_settled(self, name: str, rows: list[tuple[Any, ...]], written: set[int]) -> None:
        if name != "complete_messages":
            super()._read_settled(name, rows, written)
            return
        for row in rows:
            if row[1] is None:
                written.add(row[0])
            else:
                self._handed_over.append(dict(zip(MESSAGE_COLUMNS, row, strict=True)))

    async def claim_messages(
        self, limit: int, *, relay_id: UUID, lease_seconds: float
    ) -> list[dict[str, Any]]:
        return await self._run(
            self._claimer,
            "claim_messages",
            {"limit": limit, "relay_id": relay_id, "lease_seconds": lease_seconds},
        )

    def _statements(self, batch: Settlement) -> Sequence[tuple[str, dict[str, Any]]]:
        renamed = {
            "complete_jobs": "complete_messages",
            "retry_jobs": "retry_messages",
            "fail_jobs": "fail_messages",
            "release_jobs": "release_messages",
        }
        statements = []
        for name, params in super()._statements(batch):
            if name == "complete_jobs":
                params["sinks"] = [batch.sinks.get(i, "") for i in params["ids"]]
                params["keep_history"] = self._keep_history
                relay_id, lease_seconds = self.handoff or (None, None)
                params["relay_id"] = relay_id
                params["lease_seconds"] = lease_seconds
            statements.append((renamed[name], params))
        return statements


class SettleQueue:
    """Outcomes waiting to be written, and the one writer that writes them in batches.

    Shared by the worker and the relay. Outcomes that arrive while a write is under way
    accumulate and go in the next write (group commit). A failed write keeps its outcomes
    in front and retries with backoff: the heartbeat thread keeps their leases alive, and a
    lease that expires meanwhile means the item runs again (at least once). Once the final
    flush of a shutdown is asked for, a write that keeps failing hands over to it (which
    gives up after a few tries). A schema that lacks what the write needs (not migrated to
    this version) is not retried: ``on_schema_error`` is told, and the process stops.
    """

    def __init__(
        self,
        store: JobStore,
        written: Callable[[Settlement, set[int]], None],
        *,
        what: str,
        on_schema_error: Callable[[SchemaNotReady], None],
    ) -> None:
        self.pending = Settlement()
        self._store = store
        self._written = written
        self._what = what
        self._on_schema_error = on_schema_error
        self._wake = asyncio.Event()
        # Shutdown waits on this for a write under way instead of cancelling it.
        self._lock = asyncio.Lock()
        self._final_asked = False

    def notify(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self, *, final: bool = False) -> None:
        if final:
            self._final_asked = True
        async with self._lock:
            failures = 0
            while len(self.pending):
                batch, self.pending = self.pending, Settlement()
                try:
                    written = await self._store.settle(batch)
                except SchemaNotReady as exc:
                    self.pending = batch.merged(self.pending)
                    log.error("could not write %d %s outcomes: %s", len(batch), self._what, exc)
                    self._on_schema_error(exc)
                    return
                except DatabaseError as exc:
                    failures += 1
                    self.pending = batch.merged(self.pending)
                    if not final and self._final_asked:
                        return  # the shutdown's final flush takes over
                    if failures == 1 or failures % 20 == 0:
                        log.warning(
                            "could not write %d %s outcomes (%s); retrying",
                            len(batch),
                            self._what,
                            exc,
                        )
                    if isinstance(exc, Stopping) or (final and failures >= 5):
                        log.error(
                            "giving up on %d %s outcomes at shutdown; leases will expire",
                            len(batch),
                            self._what,
                        )
                        return
                    await asyncio.sleep(min(5.0, 0.1 * 2 ** min(failures, 6)))
                    continue
                self._written(batch, written)
