"""Procrastinate (latest release) with its documented worker options for many short async jobs.

An async task with ``concurrency`` > 1 (the documented way to run many I/O-light jobs in one
worker), LISTEN/NOTIFY on, finished jobs deleted on success (``delete_jobs="successful"``, the
documented way to keep the jobs table small), the psycopg connection pool sized for the
concurrency. Procrastinate fetches one job per round trip; it has no batch fetch. Concurrency
was picked by a sweep on this 2-core machine (README).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any

import procrastinate

from systems import Payload, WorkerSpec, run_until_stopped, tunable

QUEUE = "bench"
# Jobs in flight per worker process, by number of worker processes.
CONCURRENCY = {
    1: tunable("procrastinate_concurrency_1", 32),
    2: tunable("procrastinate_concurrency_2", 16),
}
FETCH_JOB_POLLING_INTERVAL_S = 5.0  # the default; NOTIFY wakes the worker first


def _make_app(dsn: str, pool_size: int, handle: Any = None) -> tuple[procrastinate.App, Any]:
    connector = procrastinate.PsycopgConnector(conninfo=dsn, min_size=1, max_size=pool_size)
    app = procrastinate.App(connector=connector)

    @app.task(name="noop", queue=QUEUE)
    async def noop(i: int, t: float) -> None:
        if handle is not None:
            handle({"i": i, "t": t})

    return app, noop


class ProcrastinateProducer:
    def __init__(self, app: procrastinate.App, task: Any) -> None:
        self.app = app
        self.task = task

    async def enqueue_bulk(self, payloads: Sequence[Payload]) -> None:
        # One call to procrastinate_defer_jobs_v1 with an array: one statement, one transaction.
        await self.task.batch_defer_async(*payloads)

    async def enqueue_one(self, payload: Payload) -> None:
        await self.task.defer_async(**payload)

    async def aclose(self) -> None:
        await self.app.close_async()


class ProcrastinateSystem:
    name = "procrastinate"

    def settings(self, processes: int) -> dict[str, object]:
        concurrency = CONCURRENCY.get(processes, 16)
        return {
            "version": version("procrastinate"),
            "driver": f"PsycopgConnector, psycopg {version('psycopg')}",
            "pool_max_size": concurrency + 2,
            "concurrency_per_process": concurrency,
            "listen_notify": True,
            "fetch_job_polling_interval_s": FETCH_JOB_POLLING_INTERVAL_S,
            "delete_jobs": "successful",
            "handler": "async task",
            "logging": "WARNING (per-job INFO lines off)",
            "processes": processes,
        }

    async def install(self, dsn: str) -> None:
        app, _ = _make_app(dsn, pool_size=1)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    async def open_producer(self, dsn: str) -> ProcrastinateProducer:
        app, task = _make_app(dsn, pool_size=2)
        await app.open_async()
        return ProcrastinateProducer(app, task)

    def run_worker(self, spec: WorkerSpec) -> None:
        logging.getLogger("procrastinate").setLevel(logging.WARNING)
        asyncio.run(self._work(spec))

    async def _work(self, spec: WorkerSpec) -> None:
        concurrency = CONCURRENCY.get(spec.processes, 16)
        app, _ = _make_app(spec.dsn, pool_size=concurrency + 2, handle=spec.handle)
        async with app.open_async():
            worker = asyncio.create_task(
                app.run_worker_async(
                    queues=[QUEUE],
                    concurrency=concurrency,
                    wait=True,
                    listen_notify=True,
                    fetch_job_polling_interval=FETCH_JOB_POLLING_INTERVAL_S,
                    delete_jobs="successful",
                    install_signal_handlers=False,
                )
            )
            await run_until_stopped(spec.stop)
            # Cancelling run_worker_async is Procrastinate's documented graceful stop.
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass


def create() -> ProcrastinateSystem:
    return ProcrastinateSystem()
