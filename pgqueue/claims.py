"""Where a worker's next claim of each queue starts: past the last batch it took in full."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

# Column positions in a row of the claim_jobs query.
_ID, _PRIORITY, _RUN_EPOCH = 0, 5, 12


class ClaimHint(NamedTuple):
    """A position in the claim order (priority first, then run_at, then id)."""

    priority: int
    run_epoch: float
    id: int


def hint_params(hint: ClaimHint | None) -> dict[str, Any]:
    """The claim_jobs query's hint parameters (all NULL for a scan from the start)."""
    if hint is None:
        return {"hint_priority": None, "hint_epoch": None, "hint_id": None}
    return {"hint_priority": hint.priority, "hint_epoch": hint.run_epoch, "hint_id": hint.id}


class ClaimHints:
    """Per queue, the claim-order position where this worker's last full batch ended.

    Every job claimed leaves an index entry behind until vacuum, and a claim that scans from
    the start of its queue steps over all of them: through a long drain each claim grew
    slower. A hinted claim starts where the last one ended (``claim_jobs`` explains how).

    A hint only pays while a backlog drains, so it is kept after a claim that came back
    full and dropped after one that came back short (that claim scanned from the start and
    found everything there was). At least every ``full_scan_seconds`` a claim goes without
    one, so a job that became ready behind the hint waits at most about that long. A caller
    that knows it just made a job ready behind its hint (the next job of an ordering key,
    promoted when its head was settled, keeps its place) calls :meth:`forget`.

    >>> hints = ClaimHints()
    >>> hints.get("email") is None
    True
    """

    def __init__(
        self, full_scan_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if full_scan_seconds < 0:
            raise ValueError("full_scan_seconds must be zero or more (0 turns hints off)")
        self._full_scan_seconds = full_scan_seconds
        self._clock = clock
        self._hints: dict[str, ClaimHint] = {}
        self._full_scan_due: dict[str, float] = {}
        # Queues forgotten while a claim of theirs was under way: its result must not
        # bring the hint back.
        self._forgotten: set[str] = set()

    def get(self, queue: str) -> ClaimHint | None:
        """The hint for the next claim of ``queue``, or None for a scan from the start."""
        self._forgotten.discard(queue)
        hint = self._hints.get(queue)
        if hint is not None and self._clock() < self._full_scan_due.get(queue, 0.0):
            return hint
        return None

    def forget(self, queue: str) -> None:
        """Make the next claim of ``queue`` scan from the start (even one already begun
        that ends after this call: its :meth:`record` leaves no hint)."""
        self._hints.pop(queue, None)
        self._forgotten.add(queue)

    def record(
        self,
        queue: str,
        rows: Sequence[Sequence[Any]],
        limit: int,
        hint: ClaimHint | None,
    ) -> None:
        """Remember where a claim of ``limit`` jobs, sent with ``hint``, ended with ``rows``."""
        if hint is None:
            # Counted from a claim that completed: one that failed scanned nothing.
            self._full_scan_due[queue] = self._clock() + self._full_scan_seconds
        if (
            len(rows) < limit
            or not rows
            or self._full_scan_seconds == 0
            or queue in self._forgotten
        ):
            self._hints.pop(queue, None)
            return
        # The rows come back in no particular order; the last in claim order is the one
        # with the lowest priority, then the latest run_at, then the highest id.
        last = max(rows, key=lambda row: (-row[_PRIORITY], row[_RUN_EPOCH], row[_ID]))
        self._hints[queue] = ClaimHint(
            int(last[_PRIORITY]), float(last[_RUN_EPOCH]), int(last[_ID])
        )
