"""The worker's heartbeat thread: lease renewal, liveness, rescue and light pruning.

It runs on its own thread and its own session so that a handler blocking the event loop
(or hogging the CPU in a thread) cannot starve lease renewal.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from typing import TYPE_CHECKING

from pgqueue.store import MaintenanceSession

if TYPE_CHECKING:
    from pgqueue.worker import Worker

log = logging.getLogger("pgqueue.heartbeat")

RESCUE_BATCH = 1000


class HeartbeatThread(threading.Thread):
    def __init__(self, worker: Worker) -> None:
        super().__init__(name="pgqueue-heartbeat", daemon=True)
        self._worker = worker
        self._stop_requested = threading.Event()
        settings = worker.settings
        self.interval = settings.heartbeat_seconds or settings.lease_seconds / 3
        self.rescue_interval = settings.rescue_seconds or settings.lease_seconds / 2
        self.rescued = 0

    def stop(self) -> None:
        self._stop_requested.set()

    def run(self) -> None:
        from pgqueue.app import DEFAULT_MAX_ATTEMPTS

        worker = self._worker
        session = MaintenanceSession(worker.dsn, worker.schema)
        process = {
            "id": worker.id,
            "kind": "worker",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": worker.queues,
            "concurrency": worker.settings.concurrency,
        }
        next_rescue = 0.0
        next_prune = time.monotonic() + 30
        failures = 0
        while True:
            try:
                self._renew(session)
                session.run("heartbeat_process", process)
                now = time.monotonic()
                if now >= next_rescue:
                    # Jitter spreads rescuers of many workers over time.
                    next_rescue = now + self.rescue_interval * random.uniform(0.8, 1.2)
                    self._rescue(session, DEFAULT_MAX_ATTEMPTS)
                if now >= next_prune:
                    next_prune = now + 60
                    stale = max(60.0, worker.settings.lease_seconds * 4)
                    session.run("prune_processes", {"stale_seconds": stale})
                    session.run("prune_throughput", {})
                    session.run("advance_stalled_keys", {"limit": 100})
                    session.run("prune_cron_ticks", {})
                if failures:
                    log.info("heartbeat session restored")
                failures = 0
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning("heartbeat failed (%s); will retry", exc)
            if self._stop_requested.wait(
                self.interval if not failures else min(self.interval, 1.0)
            ):
                break
        session.close()

    def _renew(self, session: MaintenanceSession) -> None:
        worker = self._worker
        leases = dict(worker.leases)
        if not leases:
            return
        rows = session.run(
            "heartbeat_jobs",
            {
                "ids": list(leases),
                "tokens": list(leases.values()),
                "lease_seconds": worker.settings.lease_seconds,
            },
        )
        renewed = {row["id"] for row in rows}
        # A job settled while this statement ran is missing too; only ids still tracked
        # with the same token are really lost.
        lost = {
            job_id
            for job_id, token in leases.items()
            if job_id not in renewed and worker.leases.get(job_id) == token
        }
        if lost and worker._loop is not None:
            worker._loop.call_soon_threadsafe(worker.on_lease_lost, lost)

    def _rescue(self, session: MaintenanceSession, default_max_attempts: int) -> None:
        while True:
            rows = session.run(
                "rescue_expired",
                {"limit": RESCUE_BATCH, "default_max_attempts": default_max_attempts},
            )
            requeued, dead = rows[0]["requeued"], rows[0]["dead"]
            if requeued or dead:
                self.rescued += requeued + dead
                log.warning(
                    "rescued jobs with expired leases: %d back to the queue, %d dead-lettered",
                    requeued,
                    dead,
                )
            if requeued + dead < RESCUE_BATCH:
                return
