"""LISTEN for new-job notifications on a dedicated session; polling stays on regardless."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from psycopg import pq

from pgqueue import db

log = logging.getLogger("pgqueue.listener")


class Listener:
    """Calls ``on_wake`` whenever a NOTIFY arrives on one of ``channels``.

    A dead session is noticed two ways: reading its socket fails, or the periodic
    ``SELECT 1`` probe (every ``probe_seconds`` of silence) fails or hangs past its timeout,
    which also catches half-open TCP connections. Either way it reconnects with backoff
    and calls ``on_wake`` once, since notifications may have been missed meanwhile.
    """

    def __init__(
        self,
        dsn: str,
        channels: Iterable[str],
        on_wake: Callable[[], None],
        *,
        probe_seconds: float = 10.0,
        role: str = "listener",
    ) -> None:
        self._dsn = dsn
        self._channels = sorted(set(channels))
        self._on_wake = on_wake
        self._probe_seconds = probe_seconds
        self._role = role
        self.reconnects = 0

    async def run(self) -> None:
        failures = 0
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await asyncio.wait_for(db.connect_async(self._dsn, self._role), timeout=15.0)
                for name in self._channels:
                    await conn.execute(db.listen_statement(name))
                if failures:
                    log.info("LISTEN session restored after %d failed attempts", failures)
                    self.reconnects += 1
                # Whatever committed before LISTEN took effect sent its NOTIFY to nobody: the
                # first session too (the caller may have claimed before it was up).
                self._on_wake()
                failures = 0
                await self._consume(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "LISTEN session lost (%s); polling continues", db.translate_error(exc)
                    )
                await asyncio.sleep(random.uniform(0, min(10.0, 0.2 * 2 ** min(failures, 6))))
            finally:
                if conn is not None:
                    try:
                        await asyncio.wait_for(conn.close(), timeout=2.0)
                    except Exception:
                        pass

    async def _consume(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # A NOTIFY read while the probe below runs comes through psycopg instead.
        conn.add_notify_handler(lambda _: self._on_wake())
        while True:
            if not await self._watch(conn.pgconn):
                # Silence: prove the session is alive (a half-open socket would hang here).
                await asyncio.wait_for(conn.execute("SELECT 1"), timeout=5.0)

    async def _watch(self, pgconn: pq.abc.PGconn) -> bool:
        """Watch the idle session for ``probe_seconds``; True when a NOTIFY arrived.

        The socket is read straight from the event loop's selector: a NOTIFY calls
        ``on_wake`` from the readiness callback, and the claim loop runs in the very next
        loop iteration. psycopg's notifies() generator re-armed its own wait first, which
        put about 0.08 ms between a NOTIFY and the claim on the pickup path. Raises when
        the session is lost.
        """
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[None] = loop.create_future()
        received = False
        socket = pgconn.socket

        def give_up(exc: Exception) -> None:
            # libpq may have closed the socket already: unwatch it now, before its number
            # can be reused by another connection.
            loop.remove_reader(socket)
            lost.set_exception(exc)

        def readable() -> None:
            nonlocal received
            if lost.done():
                return
            try:
                pgconn.consume_input()
                woken = False
                while pgconn.notifies() is not None:
                    woken = True
            except psycopg.Error as exc:
                give_up(exc)
                return
            if pgconn.status != pq.ConnStatus.OK:
                give_up(psycopg.OperationalError("the LISTEN session was closed"))
                return
            if woken:
                received = True
                self._on_wake()

        loop.add_reader(socket, readable)
        try:
            await asyncio.wait({lost}, timeout=self._probe_seconds)
        finally:
            if lost.done():
                lost.exception()  # retrieved here even when this task is cancelled
            else:
                loop.remove_reader(socket)
                lost.cancel()
        if not lost.cancelled():
            lost.result()  # raises: the session is gone
        return received
