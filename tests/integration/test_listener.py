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
