"""The contract every benchmarked queue implements, and the registry that loads them by name.

A system is measured from the outside: the harness hands it payloads to enqueue and a handler to
call once per job, and counts those calls itself. Nothing a system reports is trusted.

Lifecycle, per measurement, each time in a fresh empty database:

1. ``await system.install(dsn)`` creates the system's schema.
2. ``producer = await system.open_producer(dsn)``; ``await producer.enqueue_bulk(payloads)``
   (one transaction) or ``await producer.enqueue_one(payload)`` (one transaction per call);
   ``await producer.aclose()``.
3. In each of ``processes`` worker processes: ``system.run_worker(spec)``, which calls
   ``spec.handle(payload)`` once per job and returns once ``spec.stop.is_set()`` and its
   in-flight jobs are acknowledged.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# A job's payload as the harness builds it: {"i": job index, "t": enqueue time (monotonic s)}.
Payload = dict[str, Any]
Handler = Callable[[Payload], None]

MODULES = {
    "reference": "systems.reference",
    "pgqueuer": "systems.pgqueuer_system",
    "procrastinate": "systems.procrastinate_system",
    "pgqueue": "systems.pgqueue_system",
}


class StopFlag(Protocol):
    """A cross-process flag (a multiprocessing.Event): set once, when workers should stop."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process gets.

    handle: call it with the job's payload, decoded back to the dict that was enqueued, once per
        execution, as the handler's first action. It is cheap and never raises.
    stop: poll it (every ~20 ms is fine); once set, stop claiming, finish and acknowledge what is
        in flight, and return.
    processes: how many worker processes run side by side (1 or 2), for systems whose best
        settings depend on it.
    """

    dsn: str
    handle: Handler
    stop: StopFlag
    processes: int


class Producer(Protocol):
    async def enqueue_bulk(self, payloads: Sequence[Payload]) -> None:
        """Enqueue all payloads in ONE transaction, committed when this returns."""

    async def enqueue_one(self, payload: Payload) -> None:
        """Enqueue one job in its own transaction, committed when this returns."""

    async def aclose(self) -> None: ...


class QueueSystem(Protocol):
    name: str

    def settings(self, processes: int) -> dict[str, object]:
        """The knobs used with this many worker processes, recorded in the results."""

    async def install(self, dsn: str) -> None:
        """Create the schema in an empty database."""

    async def open_producer(self, dsn: str) -> Producer: ...

    def run_worker(self, spec: WorkerSpec) -> None:
        """Run in a worker process until spec.stop is set; blocking, owns its event loop."""


def load(name: str) -> QueueSystem:
    """Import a system's adapter module and return its ``create()``."""
    if name not in MODULES:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(MODULES)}")
    module = importlib.import_module(MODULES[name])
    system: QueueSystem = module.create()
    return system


def tunable(name: str, default: int) -> int:
    """A knob that a sweep can override through the environment: ``BENCH_<NAME>=value``.

    Spawned worker processes inherit the environment, so parent and workers agree.
    """
    import os

    value = os.environ.get(f"BENCH_{name.upper()}")
    return int(value) if value else default


def run_until_stopped(stop: StopFlag, interval_s: float = 0.02) -> Any:
    """An awaitable that finishes once the cross-process stop flag is set."""
    import asyncio

    async def wait() -> None:
        while not stop.is_set():
            await asyncio.sleep(interval_s)

    return wait()
