"""A worker's busy mark: when producers may skip the NOTIFY that would wake it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from pgqueue.timeouts import within

BUSY_AFTER_SECONDS = 1.0
# While transactions that may have skipped their NOTIFY are still open, how often to ask.
CHECK_SECONDS = 0.005


class _Store(Protocol):
    async def execute(self, name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]: ...


class BusyMark:
    """This worker's ``processes.busy_since``, and what clearing it obliges the worker to do.

    PostgreSQL serializes the commits of transactions that NOTIFY, so a one-job enqueue sends
    its NOTIFY only when a worker serving the queue may be waiting for it: one whose row is
    not marked busy (migration 0008). A worker that claimed full batches for
    ``busy_after_seconds`` claims again without waiting for anything, and marks itself busy;
    a worker without LISTEN never waits for a NOTIFY, and is marked busy at once.

    Before a listening worker waits, it clears the mark. A producer that read the mark
    before it was cleared sent no NOTIFY, but its job's row was written before that read,
    so its transaction is among those in progress once the mark is cleared: the worker
    claims again at once, and once more when the last of those transactions has ended
    (asking every ``CHECK_SECONDS``, for at most a poll interval; a NOTIFY from another
    producer may come first).

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

        While transactions open at the last clearing are still in progress, this returns
        only once they all ended (0.0), ``wake`` is set (0.0) or a poll interval has passed.
        """
        self._full_since = None
        if not self._listens:
            if not self.is_busy:
                await self._write(True)
            return poll_seconds
        if self.is_busy is not False:
            await self._clear(poll_seconds)
            return 0.0
        while self._pending:
            rows = await self._store.execute(
                "transactions_still_in_progress", {"xids": self._pending}
            )
            self._pending = list(rows[0]["xids"])
            if not self._pending:
                return 0.0  # they all ended: whatever they enqueued is visible now
            if self._clock() >= self._pending_until:
                self._pending = []  # long transactions: the poll covers them
                break
            try:
                await within(wake.wait(), CHECK_SECONDS)
                return 0.0
            except asyncio.TimeoutError:
                pass
        return poll_seconds

    async def _clear(self, poll_seconds: float) -> None:
        await self._write(False)
        rows = await self._store.execute("transactions_in_progress", {})
        self._pending = list(rows[0]["xids"])
        self._pending_until = self._clock() + poll_seconds

    async def _write(self, busy: bool) -> None:
        self.is_busy = None  # unknown until the write is known to have committed
        await self._store.execute("mark_worker_busy", {**self._process(), "busy": busy})
        self.is_busy = busy
        self._full_since = None
        if busy:
            self._pending = []
