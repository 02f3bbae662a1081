"""LISTEN for new-job notifications on a dedicated session; polling stays on regardless."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from pgqueue import db

log = logging.getLogger("pgqueue.listener")


class Listener:
    """Calls ``on_wake`` whenever a NOTIFY arrives on one of ``channels``.

    A dead session is noticed two ways: the notification stream raises, or the periodic
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
        while True:
            received = False
            async for _ in conn.notifies(timeout=self._probe_seconds):
                received = True
                self._on_wake()
            if not received:
                # Silence: prove the session is alive (a half-open socket would hang here).
                await asyncio.wait_for(conn.execute("SELECT 1"), timeout=5.0)
