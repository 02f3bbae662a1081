"""Count handler calls in shared memory, per worker process, so the harness can verify delivery.

Each worker process gets its own arrays (one writer each, no locks, no database writes): how
often every job index ran, when it first started, how many calls so far and the time of the last.
"""

from __future__ import annotations

import ctypes
import multiprocessing.sharedctypes as shared
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from systems import Payload


@dataclass
class Probe:
    """Shared counters of one worker process; pass it to the process, call ``handle`` there."""

    runs: Any  # RawArray of c_uint8, one per job index
    starts: Any  # RawArray of c_double (monotonic s at first start), or length 0
    calls: Any  # RawValue c_int64
    last_call: Any  # RawValue c_double

    @classmethod
    def create(cls, jobs: int, record_starts: bool) -> Probe:
        return cls(
            runs=shared.RawArray(ctypes.c_uint8, jobs),
            starts=shared.RawArray(ctypes.c_double, jobs if record_starts else 0),
            calls=shared.RawValue(ctypes.c_int64, 0),
            last_call=shared.RawValue(ctypes.c_double, 0.0),
        )

    def handle(self, payload: Payload) -> None:
        now = time.monotonic()
        index = int(payload["i"])
        if len(self.starts) and not self.starts[index]:
            self.starts[index] = now
        runs = self.runs[index]
        self.runs[index] = runs + 1 if runs < 255 else 255
        self.calls.value += 1
        self.last_call.value = now


@dataclass(frozen=True)
class Delivery:
    """How the handler calls of all processes compare with the jobs enqueued."""

    jobs: int
    calls: int
    missing: int
    duplicates: int  # jobs that ran more than once

    @property
    def is_exact(self) -> bool:
        return self.missing == 0 and self.duplicates == 0 and self.calls == self.jobs


def total_calls(probes: Sequence[Probe]) -> int:
    return sum(int(probe.calls.value) for probe in probes)


def last_call(probes: Sequence[Probe]) -> float:
    return max(float(probe.last_call.value) for probe in probes)


def delivery(probes: Sequence[Probe], jobs: int) -> Delivery:
    """Compare the per-job run counts of all processes with the ``jobs`` enqueued (0..jobs-1)."""
    if len(probes) == 1:
        counts = bytes(probes[0].runs)[:jobs]
    else:
        per_process = [bytes(probe.runs)[:jobs] for probe in probes]
        counts = bytes(min(255, sum(column)) for column in zip(*per_process, strict=True))
    missing = counts.count(0)
    once = counts.count(1)
    return Delivery(
        jobs=jobs, calls=total_calls(probes), missing=missing, duplicates=jobs - missing - once
    )


def first_starts(probes: Sequence[Probe], jobs: int) -> list[float]:
    """Earliest start time of each job across processes (0.0 where it never ran)."""
    starts = [0.0] * jobs
    for probe in probes:
        for index, value in enumerate(probe.starts[:jobs]):
            if value and (not starts[index] or value < starts[index]):
                starts[index] = value
    return starts
