"""Periodic jobs: turn cron ticks into jobs, each tick once across all workers."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from pgqueue.enqueue import JobSpec, build

if TYPE_CHECKING:
    from pgqueue.app import Periodic
    from pgqueue.worker import Worker

log = logging.getLogger("pgqueue.cron")

MAX_BACKFILL = 1000
CLOCK_REFRESH_SECONDS = 30.0


class Scheduler:
    """Runs inside a worker. Times come from the database clock: the offset between it and
    the local monotonic clock is re-measured every 30 s, so a skewed host clock does not
    move ticks."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._entries = list(worker.app.periodic_jobs.values())
        self._last: dict[str, datetime] = {}
        self._offset: float | None = None
        self._offset_at = 0.0
        self.enqueued = 0

    async def _now(self) -> datetime:
        if self._offset is None or time.monotonic() - self._offset_at > CLOCK_REFRESH_SECONDS:
            before = time.monotonic()
            rows = await self._worker.store.execute("database_now", {})
            after = time.monotonic()
            database_now: datetime = rows[0]["now"]
            self._offset = database_now.timestamp() - (before + after) / 2
            self._offset_at = after
        return datetime.fromtimestamp(time.monotonic() + self._offset, timezone.utc)

    async def run(self) -> None:
        if not self._entries:
            return
        rows = await self._worker.store.execute(
            "last_cron_ticks", {"names": [entry.name for entry in self._entries]}
        )
        self._last = {row["name"]: row["tick_at"] for row in rows}
        failures = 0
        while True:
            try:
                now = await self._now()
                for entry in self._entries:
                    await self._fire_due(entry, now)
                failures = 0
                now = await self._now()
                upcoming = min(entry.schedule.next_after(now) for entry in self._entries)
                delay = (upcoming - now).total_seconds()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("periodic jobs: %s; retrying", exc)
                delay = 1.0
            await asyncio.sleep(max(0.01, min(delay, 1.0)))

    async def _fire_due(self, entry: Periodic, now: datetime) -> None:
        latest = entry.schedule.latest_at_or_before(now)
        if latest is None:
            return
        last = self._last.get(entry.name)
        if last is not None and latest <= last:
            return
        if last is None:
            ticks = [latest]
        else:
            ticks = entry.schedule.ticks_between(last, latest, MAX_BACKFILL)
        if not entry.backfill:
            # Ticks missed while no worker ran are skipped (no flood after downtime); a
            # scheduler that merely ran late still enqueues every tick within the grace.
            grace = timedelta(seconds=entry.misfire_grace_seconds)
            ticks = [tick for tick in ticks if now - tick <= grace]
        for tick in ticks:
            await self._enqueue_tick(entry, tick)
        self._last[entry.name] = latest

    async def _enqueue_tick(self, entry: Periodic, tick: datetime) -> None:
        worker = self._worker
        task = worker.app.tasks[entry.task]
        spec = JobSpec(
            task=entry.task,
            args=entry.args,
            queue=task.queue,
            max_attempts=task.max_attempts,
            headers={"pgqueue-cron": entry.name, "pgqueue-cron-tick": tick.isoformat()},
        )
        built = build([spec], {}, worker.schema)
        assert built is not None
        job_id = await worker.store.cron_tick(entry.name, tick, built[0], built[1])
        if job_id is not None:
            self.enqueued += 1
            log.info("periodic %s: tick %s enqueued as job %d", entry.name, tick, job_id)
