"""Deadlines for awaits: one call (``within``) or many concurrent ones (``DeadlineWatch``)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``await awaitable``, raising ``asyncio.TimeoutError`` after ``seconds``.

    On Python 3.11+ this uses ``asyncio.timeout`` (no task per call: it matters on the
    hot path, once per job or delivery); before that, ``asyncio.wait_for``.
    """
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class DeadlineWatch:
    """Deadlines for many concurrent awaits, enforced by one periodic scan.

    ``asyncio.timeout`` arms and cancels a timer for every call; at thousands of deliveries
    a second that cost more than the deliveries' own bookkeeping. Here a call registers its
    task and deadline in a dict, and :meth:`run` (one task per watch) cancels the tasks
    past theirs every ``resolution_seconds``: a deadline fires at most that late.

    >>> watch = DeadlineWatch(0.05)      # and asyncio.create_task(watch.run())
    >>> async with watch.limit(10.0):
    ...     await send()                 # raises asyncio.TimeoutError past 10 s
    """

    def __init__(self, resolution_seconds: float) -> None:
        self.resolution_seconds = resolution_seconds
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.resolution_seconds)
            now = loop.time()
            for task, deadline in list(self._deadlines.items()):
                if now > deadline and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()

    def limit(self, seconds: float, message: str = "") -> _Limit:
        """An async context manager: the block raises ``asyncio.TimeoutError(message)`` past
        ``seconds``."""
        return _Limit(self, seconds, message)


class _Limit:
    def __init__(self, watch: DeadlineWatch, seconds: float, message: str) -> None:
        self._watch = watch
        self._seconds = seconds
        self._message = message
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("DeadlineWatch.limit() needs a running task")
        self._task = task
        # Cancellations requested before the block (Python 3.11+ counts them).
        self._cancelling = task.cancelling() if hasattr(task, "cancelling") else 0
        self._watch._deadlines[task] = asyncio.get_running_loop().time() + self._seconds

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        task = self._task
        assert task is not None
        self._watch._deadlines.pop(task, None)
        if task not in self._watch._expired:
            return
        self._watch._expired.discard(task)
        # The watch cancelled this block. Only that cancellation becomes a timeout: one
        # requested by someone else (a shutdown) meanwhile still propagates.
        remaining = task.uncancel() if hasattr(task, "uncancel") else 0
        if exc_type is asyncio.CancelledError and remaining <= self._cancelling:
            raise asyncio.TimeoutError(self._message) from exc


def watch_resolution(shortest_seconds: float) -> float:
    """How often a :class:`DeadlineWatch` scans: a twentieth of its shortest deadline,
    between 10 ms and 0.5 s."""
    return min(0.5, max(0.01, shortest_seconds / 20))
