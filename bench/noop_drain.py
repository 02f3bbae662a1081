"""One pgqueue worker, in this process, draining the "bench" queue of no-op jobs.

Shared by features.py and cpu_split.py: the settings of the main benchmark's pgqueue adapter
for one process.
"""

from __future__ import annotations

import asyncio
import time

import pgqueue


def drain(dsn: str, jobs: int) -> tuple[float, float]:
    """Run until ``jobs`` handler calls; return the perf_counter times of start and finish."""
    app = pgqueue.App()
    done = [0]

    @app.task(queue="bench")
    async def noop(job: pgqueue.Job, **_: object) -> None:
        done[0] += 1

    settings = pgqueue.WorkerSettings(concurrency=2000, batch_size=1000, lease_seconds=30)
    worker = pgqueue.Worker(app, dsn, queues=["bench"], settings=settings)
    times = [0.0, 0.0]

    async def main() -> None:
        run = asyncio.create_task(worker.run_async())
        times[0] = time.perf_counter()
        while done[0] < jobs:
            await asyncio.sleep(0.005)
        times[1] = time.perf_counter()
        worker.request_stop()
        await run

    asyncio.run(main())
    return times[0], times[1]
