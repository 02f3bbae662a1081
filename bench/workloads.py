"""The measurements: bulk enqueue + drain, pickup latency and a sustained run, for one system.

Every measurement gets a fresh database. Worker processes are spawned, import their system and
report ready before the clock starts; the clock stops at the last handler call, read from the
shared counters of ``probe``. Nothing here asserts a timing: it measures and returns.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event
from typing import Any

import psycopg
import systems
from probe import Probe, delivery, first_starts, last_call, total_calls
from server import PostgresServer
from systems import Payload, WorkerSpec

SPAWN = multiprocessing.get_context("spawn")
ENQUEUE_CHUNK = 50_000  # sustained runs enqueue in transactions of this size
LATENCY_WARMUP_JOBS = 5
SETTLE_S = 0.5  # after the last expected call: time for a late duplicate to show up


class MeasurementError(RuntimeError):
    """A run that could not complete: a worker died, or jobs never ran before the deadline."""


def _worker_main(
    name: str, dsn: str, probe: Probe, processes: int, ready: Event, go: Event, stop: Event
) -> None:
    logging.basicConfig(level=logging.WARNING)
    system = systems.load(name)
    ready.set()
    go.wait()
    system.run_worker(WorkerSpec(dsn=dsn, handle=probe.handle, stop=stop, processes=processes))


@dataclass
class Workers:
    """``processes`` worker processes of one system, each with its own probe."""

    name: str
    dsn: str
    probes: list[Probe]
    go: Event = field(default_factory=SPAWN.Event)
    stop: Event = field(default_factory=SPAWN.Event)
    procs: list[SpawnProcess] = field(default_factory=list)

    def start(self, timeout_s: float = 120.0) -> None:
        readies = []
        for probe in self.probes:
            ready = SPAWN.Event()
            args = (self.name, self.dsn, probe, len(self.probes), ready, self.go, self.stop)
            proc = SPAWN.Process(target=_worker_main, args=args, daemon=True)
            proc.start()
            self.procs.append(proc)
            readies.append(ready)
        deadline = time.monotonic() + timeout_s
        for ready in readies:
            while not ready.wait(0.05):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise MeasurementError("worker processes did not become ready")

    def release(self) -> float:
        """Let the workers run; returns the start time of the clock."""
        started = time.monotonic()
        self.go.set()
        return started

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.is_alive():
                raise MeasurementError(f"a worker process exited early (code {proc.exitcode})")

    def shutdown(self, timeout_s: float = 60.0) -> None:
        self.stop.set()
        self.go.set()
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                print(f"warning: a {self.name} worker ignored the stop flag; terminating it")
                proc.terminate()
                proc.join(5)
            elif proc.exitcode:
                print(f"warning: a {self.name} worker exited with code {proc.exitcode}")
        self.procs.clear()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def wait_for_calls(
    workers: Workers,
    expected: int,
    timeout_s: float,
    poll_s: float = 0.005,
    samples: list[tuple[float, int]] | None = None,
) -> None:
    """Block until the handlers ran ``expected`` times in all; optionally record (time, calls)."""
    deadline = time.monotonic() + timeout_s
    while True:
        calls = total_calls(workers.probes)
        if samples is not None:
            samples.append((time.monotonic(), calls))
        if calls >= expected:
            return
        workers.check_alive()
        if time.monotonic() > deadline:
            raise MeasurementError(f"only {calls} of {expected} jobs ran within {timeout_s:.0f} s")
        time.sleep(poll_s)


def make_payloads(start: int, count: int) -> list[Payload]:
    now = time.monotonic()
    return [{"i": index, "t": now} for index in range(start, start + count)]


async def _install_and_enqueue(
    system: systems.QueueSystem,
    dsn: str,
    payloads: Sequence[Payload],
    chunk: int,
    analyze: bool = False,
) -> float:
    """Install the schema, enqueue in transactions of ``chunk``; returns seconds spent enqueuing.

    ``analyze`` (diagnosis only) gives the planner statistics before the workers start; the
    real figures are taken without, as a queue sees them right after a burst into an empty table.
    """
    await system.install(dsn)
    producer = await system.open_producer(dsn)
    try:
        started = time.perf_counter()
        for offset in range(0, len(payloads), chunk):
            await producer.enqueue_bulk(payloads[offset : offset + chunk])
        elapsed = time.perf_counter() - started
    finally:
        await producer.aclose()
    if analyze:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("ANALYZE")
    return elapsed


def drain_timeout_s(jobs: int) -> float:
    return max(120.0, jobs / 100)


def measure_enqueue_drain(
    server: PostgresServer,
    name: str,
    database: str,
    jobs: int,
    processes: int,
    drain: bool,
    analyze: bool = False,
) -> dict[str, Any]:
    """Bulk-enqueue ``jobs`` in one transaction, then (if ``drain``) time the burn-down."""
    system = systems.load(name)
    dsn = server.create_database(database)
    try:
        enqueue_s = asyncio.run(
            _install_and_enqueue(system, dsn, make_payloads(0, jobs), jobs, analyze)
        )
        result: dict[str, Any] = {"enqueue_jobs_per_s": jobs / enqueue_s}
        if not drain:
            return result
        with Workers(
            name, dsn, [Probe.create(jobs, record_starts=False) for _ in range(processes)]
        ) as workers:
            workers.start()
            started = workers.release()
            wait_for_calls(workers, jobs, drain_timeout_s(jobs))
            finished = last_call(workers.probes)
            time.sleep(SETTLE_S)
            workers.shutdown()
            seen = delivery(workers.probes, jobs)
        result.update(
            drain_jobs_per_s=jobs / (finished - started),
            drain_s=finished - started,
            missing=seen.missing,
            duplicates=seen.duplicates,
            handler_calls=seen.calls,
        )
        return result
    finally:
        server.drop_database(database)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with ``fraction`` of all values at or below."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


async def _send_paced(
    system: systems.QueueSystem, dsn: str, workers: Workers, count: int, rate_per_s: float
) -> tuple[list[float], list[float]]:
    """Warm the worker up, enqueue ``count`` single jobs at ``rate_per_s``.

    Returns the send times and how long each enqueue call took (ms, to its commit).
    """
    producer = await system.open_producer(dsn)
    try:
        for payload in make_payloads(0, LATENCY_WARMUP_JOBS):
            await producer.enqueue_one(payload)
        await asyncio.to_thread(wait_for_calls, workers, LATENCY_WARMUP_JOBS, 60.0)
        await asyncio.sleep(0.5)
        sent: list[float] = []
        call_ms: list[float] = []
        begin = time.monotonic()
        for number in range(count):
            await asyncio.sleep(max(0.0, begin + number / rate_per_s - time.monotonic()))
            now = time.monotonic()
            await producer.enqueue_one({"i": LATENCY_WARMUP_JOBS + number, "t": now})
            sent.append(now)
            call_ms.append((time.monotonic() - now) * 1000)
        return sent, call_ms
    finally:
        await producer.aclose()


def measure_latency(
    server: PostgresServer, name: str, database: str, count: int, rate_per_s: float
) -> dict[str, Any]:
    """Enqueue-to-handler-start latency of ``count`` single-job transactions, one worker process."""
    system = systems.load(name)
    dsn = server.create_database(database)
    total = LATENCY_WARMUP_JOBS + count
    try:
        asyncio.run(system.install(dsn))
        with Workers(name, dsn, [Probe.create(total, record_starts=True)]) as workers:
            workers.start()
            workers.release()
            sent, call_ms = asyncio.run(_send_paced(system, dsn, workers, count, rate_per_s))
            wait_for_calls(workers, total, 60.0)
            time.sleep(SETTLE_S)
            workers.shutdown()
            starts = first_starts(workers.probes, total)[LATENCY_WARMUP_JOBS:]
            seen = delivery(workers.probes, total)
        latencies_ms = [
            (start - at) * 1000 for start, at in zip(starts, sent, strict=True) if start
        ]
        return {
            "p50_ms": percentile(latencies_ms, 0.50),
            "p99_ms": percentile(latencies_ms, 0.99),
            "max_ms": max(latencies_ms),
            "enqueue_call_p50_ms": percentile(call_ms, 0.50),
            "missing": seen.missing,
            "duplicates": seen.duplicates,
        }
    finally:
        server.drop_database(database)


def _window_rate(samples: Sequence[tuple[float, int]], low: int, high: int) -> float:
    """Jobs per second between the first samples at or above ``low`` and ``high`` calls."""
    t_low, c_low = next((t, c) for t, c in samples if c >= low)
    t_high, c_high = next((t, c) for t, c in samples if c >= high)
    return (c_high - c_low) / (t_high - t_low) if t_high > t_low else float("nan")


def measure_sustained(
    server: PostgresServer,
    name: str,
    database: str,
    jobs: int,
    processes: int,
    analyze: bool = False,
) -> dict[str, Any]:
    """Enqueue ``jobs`` (in 50,000-job transactions), drain them, compare first and last 10%."""
    system = systems.load(name)
    dsn = server.create_database(database)
    try:
        payloads = make_payloads(0, jobs)
        asyncio.run(_install_and_enqueue(system, dsn, payloads, ENQUEUE_CHUNK, analyze))
        del payloads
        samples: list[tuple[float, int]] = []
        with Workers(
            name, dsn, [Probe.create(jobs, record_starts=False) for _ in range(processes)]
        ) as workers:
            workers.start()
            started = workers.release()
            wait_for_calls(workers, jobs, drain_timeout_s(jobs), 0.01, samples)
            finished = last_call(workers.probes)
            samples[-1] = (finished, samples[-1][1])
            time.sleep(SETTLE_S)
            workers.shutdown()
            seen = delivery(workers.probes, jobs)
        first = _window_rate(samples, 1, jobs // 10)
        last = _window_rate(samples, jobs - jobs // 10, jobs)
        return {
            "sustained_jobs_per_s": jobs / (finished - started),
            "first10_jobs_per_s": first,
            "last10_jobs_per_s": last,
            "last_vs_first": last / first,
            "missing": seen.missing,
            "duplicates": seen.duplicates,
        }
    finally:
        server.drop_database(database)
