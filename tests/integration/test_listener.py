"""The LISTEN session: a wake-up when it is up (NOTIFYs sent before went to nobody), one per
NOTIFY after."""

from __future__ import annotations

import asyncio

import psycopg

from pgqueue.listener import Listener


async def test_the_listener_wakes_its_owner_once_up_and_then_on_each_notify(dsn: str) -> None:
    wakes: list[str] = []
    woken = asyncio.Event()

    def on_wake() -> None:
        wakes.append("wake")
        woken.set()

    listener = Listener(dsn, ["pgqueue_test_channel"], on_wake, role="test-listen")
    task = asyncio.create_task(listener.run())
    try:
        # Nothing was sent: this first wake-up covers whatever committed before LISTEN.
        await asyncio.wait_for(woken.wait(), 10)
        assert wakes == ["wake"]
        woken.clear()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("NOTIFY pgqueue_test_channel")
        await asyncio.wait_for(woken.wait(), 10)
        assert wakes == ["wake", "wake"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _notify(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("NOTIFY pgqueue_test_channel")


async def test_notifies_still_wake_after_silent_probes(dsn: str) -> None:
    """Between probes of a silent session the socket is watched again each time."""
    wakes: list[float] = []
    woken = asyncio.Event()

    def on_wake() -> None:
        wakes.append(asyncio.get_running_loop().time())
        woken.set()

    listener = Listener(dsn, ["pgqueue_test_channel"], on_wake, probe_seconds=0.05)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(woken.wait(), 10)
        await asyncio.sleep(0.4)  # several silent windows, each ended by a SELECT 1
        assert len(wakes) == 1 and not task.done()
        for expected in (2, 3):
            woken.clear()
            await _notify(dsn)
            await asyncio.wait_for(woken.wait(), 10)
            assert len(wakes) == expected
        assert listener.reconnects == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_terminated_session_is_replaced_and_wakes_its_owner(dsn: str) -> None:
    wakes: list[str] = []
    woken = asyncio.Event()

    def on_wake() -> None:
        wakes.append("wake")
        woken.set()

    listener = Listener(dsn, ["pgqueue_test_channel"], on_wake, role="test-terminated")
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(woken.wait(), 10)
        woken.clear()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cursor = await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE %s",
                ("%test-terminated%",),
            )
            assert [row[0] for row in await cursor.fetchall()] == [True]
        # The loss is seen on the socket at once; the new session wakes its owner (NOTIFYs
        # sent meanwhile went to nobody) and then hears NOTIFYs as before.
        await asyncio.wait_for(woken.wait(), 10)
        assert listener.reconnects == 1 and wakes == ["wake", "wake"]
        woken.clear()
        await _notify(dsn)
        await asyncio.wait_for(woken.wait(), 10)
        assert wakes == ["wake", "wake", "wake"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
