"""The heartbeat thread of workers and relays: lease renewal, liveness, rescue, pruning.

It runs on its own thread and its own session so that a handler blocking the event loop
(or hogging the CPU in a thread) cannot starve lease renewal.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from uuid import UUID

from pgqueue.store import MaintenanceSession

log = logging.getLogger("pgqueue.heartbeat")

RESCUE_BATCH = 1000


class LeaseHolder(Protocol):
    """What the heartbeat thread needs from a worker or relay."""

    dsn: str
    schema: str
    leases: dict[int, UUID]

    @property
    def lease_seconds(self) -> float: ...

    @property
    def process(self) -> Mapping[str, Any]: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...

    def on_lease_lost(self, ids: set[int]) -> None: ...


class HeartbeatThread(threading.Thread):
    """Every ``interval``: renew held leases; every ``rescue_interval``: ``rescue``;
    every minute: ``prune``. Each step is one or a few statements on its own session."""

    def __init__(
        self,
        owner: LeaseHolder,
        *,
        renew_query: str,
        rescue: Callable[[MaintenanceSession], int],
        prune: Callable[[MaintenanceSession], None],
        interval: float,
        rescue_interval: float,
    ) -> None:
        super().__init__(name="pgqueue-heartbeat", daemon=True)
        self._owner = owner
        self._renew_query = renew_query
        self._rescue = rescue
        self._prune = prune
        self._stop_requested = threading.Event()
        self.interval = interval
        self.rescue_interval = rescue_interval
        self.rescued = 0

    def stop(self) -> None:
        self._stop_requested.set()

    def run(self) -> None:
        owner = self._owner
        session = MaintenanceSession(owner.dsn, owner.schema)
        next_rescue = 0.0
        next_prune = time.monotonic() + 30
        failures = 0
        while True:
            try:
                self._renew(session)
                session.run("heartbeat_process", owner.process)
                now = time.monotonic()
                if now >= next_rescue:
                    # Jitter spreads the rescuers of many processes over time.
                    next_rescue = now + self.rescue_interval * random.uniform(0.8, 1.2)
                    self.rescued += self._rescue(session)
                if now >= next_prune:
                    next_prune = now + 60
                    self._prune(session)
                if failures:
                    log.info("heartbeat session restored")
                failures = 0
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning("heartbeat failed (%s); will retry", exc)
            wait = self.interval if not failures else min(self.interval, 1.0)
            if self._stop_requested.wait(wait):
                break
        session.close()

    def _renew(self, session: MaintenanceSession) -> None:
        owner = self._owner
        leases = dict(owner.leases)
        if not leases:
            return
        rows = session.run(
            self._renew_query,
            {
                "ids": list(leases),
                "tokens": list(leases.values()),
                "lease_seconds": owner.lease_seconds,
            },
        )
        renewed = {row["id"] for row in rows}
        # Something settled while this statement ran is missing too; only ids still held
        # with the same token are really lost.
        lost = {
            item
            for item, token in leases.items()
            if item not in renewed and owner.leases.get(item) == token
        }
        if lost and owner.loop is not None:
            owner.loop.call_soon_threadsafe(owner.on_lease_lost, lost)


def rescue_in_batches(session: MaintenanceSession, query: str, params: Mapping[str, Any]) -> int:
    """Run a rescue query until it returns less than a full batch; total rows rescued."""
    total = 0
    while True:
        row = session.run(query, {"limit": RESCUE_BATCH, **params})[0]
        count = sum(int(value) for value in row.values())
        total += count
        if count:
            log.warning("rescued %s after expired leases (%s)", count, query)
        if count < RESCUE_BATCH:
            return total
