"""The LISTEN session: a wake-up when it is up (NOTIFYs sent before went to nobody), one per
NOTIFY after, also across silent probe windows and a replaced session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg

from pgqueue.listener import Listener

CHANNEL = "pgqueue_test_channel"


class Wakes:
    """Counts a listener's wake-ups; :meth:`next` waits for the next one."""

    def __init__(self) -> None:
        self.count = 0
        self._woken = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self._woken.set()

    async def next(self) -> int:
        await asyncio.wait_for(self._woken.wait(), 10)
        self._woken.clear()
        return self.count


@asynccontextmanager
async def listening(dsn: str, **options: Any) -> AsyncIterator[tuple[Listener, Wakes]]:
    wakes = Wakes()
    listener = Listener(dsn, [CHANNEL], wakes, **options)
    task = asyncio.create_task(listener.run())
    try:
        yield listener, wakes
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _notify(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f"NOTIFY {CHANNEL}")


async def test_the_listener_wakes_its_owner_once_up_and_then_on_each_notify(dsn: str) -> None:
    async with listening(dsn, role="test-listen") as (_, wakes):
        # Nothing was sent: this first wake-up covers whatever committed before LISTEN.
        assert await wakes.next() == 1
        await _notify(dsn)
        assert await wakes.next() == 2


async def test_notifies_still_wake_after_silent_probes(dsn: str) -> None:
    """Between probes of a silent session the socket is watched again each time."""
    async with listening(dsn, probe_seconds=0.05) as (listener, wakes):
        assert await wakes.next() == 1
        await asyncio.sleep(0.4)  # several silent windows, each ended by a SELECT 1
        assert wakes.count == 1
        for expected in (2, 3):
            await _notify(dsn)
            assert await wakes.next() == expected
        assert listener.reconnects == 0


async def test_a_terminated_session_is_replaced_and_wakes_its_owner(dsn: str) -> None:
    async with listening(dsn, role="test-terminated") as (listener, wakes):
        assert await wakes.next() == 1
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cursor = await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE %s",
                ("%test-terminated%",),
            )
            assert [row[0] for row in await cursor.fetchall()] == [True]
        # The loss is seen on the socket at once; the new session wakes its owner (NOTIFYs
        # sent meanwhile went to nobody) and then hears NOTIFYs as before.
        assert await wakes.next() == 2
        assert listener.reconnects == 1
        await _notify(dsn)
        assert await wakes.next() == 3
