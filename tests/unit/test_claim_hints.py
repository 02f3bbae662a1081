"""ClaimHints: when a worker's claim carries a hint, and which position it is."""

from __future__ import annotations

from typing import Any

import pytest

from pgqueue.claims import ClaimHint, ClaimHints


def row(job_id: int, priority: int, run_epoch: float) -> tuple[Any, ...]:
    # Column positions of the claim_jobs query: id 0, priority 5, run_at epoch 12.
    return (job_id, "q", "t", "{}", None, priority, 1, 3, None, None, None, 0.0, run_epoch)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_full_batch_leaves_a_hint_at_its_last_position_in_claim_order() -> None:
    clock = Clock()
    hints = ClaimHints(1.0, clock=clock)
    assert hints.get("q") is None
    # Lowest priority last; within it the latest run_at, then the highest id.
    rows = [row(7, 5, 10.0), row(3, 0, 12.5), row(9, 0, 12.5), row(4, 0, 11.0), row(8, 5, 13.0)]
    hints.record("q", rows, 5)
    assert hints.get("q") == ClaimHint(0, 12.5, 9)
    assert hints.get("other") is None


def test_a_short_batch_drops_the_hint() -> None:
    hints = ClaimHints(1.0, clock=Clock())
    hints.get("q")
    hints.record("q", [row(1, 0, 1.0), row(2, 0, 1.0)], 2)
    assert hints.get("q") is not None
    hints.record("q", [row(3, 0, 1.0)], 2)
    assert hints.get("q") is None
    hints.record("q", [], 2)
    assert hints.get("q") is None


def test_a_claim_from_the_start_happens_at_least_every_full_scan_seconds() -> None:
    clock = Clock()
    hints = ClaimHints(1.0, clock=clock)
    assert hints.get("q") is None  # the first claim scans from the start
    for step in range(5):
        clock.now += 0.3
        hints.record("q", [row(step, 0, 1.0)], 1)
        hint = hints.get("q")
        # 0.3, 0.6 and 0.9 s after the last full scan: hinted; at 1.2 s: from the start.
        assert (hint is None) == (step == 3), step


def test_zero_seconds_turns_hints_off_and_negative_is_refused() -> None:
    hints = ClaimHints(0.0, clock=Clock())
    hints.get("q")
    hints.record("q", [row(1, 0, 1.0)], 1)
    assert hints.get("q") is None
    with pytest.raises(ValueError, match="zero or more"):
        ClaimHints(-1.0)
