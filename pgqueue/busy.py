"""A worker's busy mark: when producers may skip the NOTIFY that would wake it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from pgqueue.errors import DatabaseError, SchemaNotReady
from pgqueue.timeouts import within

BUSY_AFTER_SECONDS = 1.0
# While transactions that may have skipped their NOTIFY are still open, how often to ask.
CHECK_SECONDS = 0.005
MAX_CHECK_SECONDS = 0.1
UNDEFINED_COLUMN = "42703"


class _Store(Protocol):
    async def execute(self, name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]: ...


class BusyMark:
    """This worker's ``processes.busy_since``, and what clearing it obliges the worker to do.

    PostgreSQL serializes the commits of transactions that NOTIFY, so a one-job enqueue skips
    its NOTIFY when the queue has workers and every one of them is marked busy (migration
    0008). A worker that claimed full batches for ``busy_after_seconds`` claims again
    without waiting for anything, and marks itself busy; a worker without LISTEN never
    waits for a NOTIFY, and is marked busy at once.

    Before a listening worker waits, it clears the mark. A producer that read the mark
    before it was cleared sent no NOTIFY, but (under READ COMMITTED; producers in stricter
    isolation levels always notify) its job's row was written before that read, so its
    transaction is in progress or committed once the mark is cleared: the worker claims
    again at once, and again whenever one of the transactions then in progress ends (see
    :meth:`before_wait`; a NOTIFY from another producer may come first).

    :meth:`start` writes the mark before the first claim, and creates the process row if
    the heartbeat has not yet.

    >>> mark = BusyMark(store, lambda: worker.process, listens=True)
    >>> mark.is_busy is None  # until ``await mark.start(poll_seconds=1.0)``
    True
    """

    def __init__(
        self,
        store: _Store,
        process: Callable[[], Mapping[str, Any]],
        *,
        listens: bool,
        busy_after_seconds: float = BUSY_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._process = process
        self._listens = listens
        self._busy_after_seconds = busy_after_seconds
        self._clock = clock
        self.is_busy: bool | None = None
        self._full_since: float | None = None
        self._pending: list[str] = []
        self._pending_until = 0.0

    async def start(self, poll_seconds: float) -> None:
        """Write the mark before the first claim (which then sees what committed before)."""
        if self._listens:
            await self._clear(poll_seconds)
        else:
            await self._write(True)

    async def claimed_full(self) -> None:
        """A claim round filled its batch: mark busy once that lasted ``busy_after_seconds``."""
        if self.is_busy:
            return
        if not self._listens:
            await self._write(True)
            return
        now = self._clock()
        if self._full_since is None:
            self._full_since = now
        elif now - self._full_since >= self._busy_after_seconds:
            await self._write(True)

    async def before_wait(self, poll_seconds: float, wake: asyncio.Event) -> float:
        """A claim round came back short: how long to wait for ``wake`` (a NOTIFY) before the
        next claim; 0.0 means claim again at once.

        While transactions open at the last clearing are in progress, this returns 0.0 as
        soon as one of them ends (its job, if any, is visible now; the rest are watched on
        after that claim), when ``wake`` is set, or when a poll interval has passed since
        the clearing (the poll covers longer transactions from then on). It asks every
        ``CHECK_SECONDS`` at first, then less often: the list holds every transaction open
        on the server, an idle session in another database included.
        """
        self._full_since = None
        if not self._listens:
            if not self.is_busy:
                await self._write(True)
            return poll_seconds
        if self.is_busy is not False:
            await self._clear(poll_seconds)
            return 0.0
        interval = CHECK_SECONDS
        while self._pending:
            if self._clock() >= self._pending_until:
                self._pending = []
                return 0.0
            rows = await self._store.execute(
                "transactions_still_in_progress", {"xids": self._pending}
            )
            still = list(rows[0]["xids"])
            ended = len(still) < len(self._pending)
            self._pending = still
            if ended:
                return 0.0
            try:
                await within(wake.wait(), interval)
                return 0.0
            except asyncio.TimeoutError:
                interval = min(interval * 2, MAX_CHECK_SECONDS)
        return poll_seconds

    async def _clear(self, poll_seconds: float) -> None:
        """Clear the mark, then note the transactions in progress (both, or the mark is
        unknown and cleared again next time)."""
        await self._write(False)
        self.is_busy = None
        rows = await self._store.execute("transactions_in_progress", {})
        self._pending = list(rows[0]["xids"])
        self._pending_until = self._clock() + poll_seconds
        self.is_busy = False

    async def _write(self, busy: bool) -> None:
        self.is_busy = None  # unknown until the write is known to have committed
        try:
            await self._store.execute("mark_worker_busy", {**self._process(), "busy": busy})
        except DatabaseError as exc:
            if exc.sqlstate == UNDEFINED_COLUMN:
                # processes.busy_since comes with migration 0008.
                raise SchemaNotReady(
                    "the pgqueue schema is older than this pgqueue in this database: run "
                    "`pgqueue migrate` (or pgqueue.migrate.upgrade(dsn)) first"
                ) from exc
            raise
        self.is_busy = busy
        self._full_since = None
        if busy:
            self._pending = []
