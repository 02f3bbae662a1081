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


def claim(hints: ClaimHints, rows: list[tuple[Any, ...]], limit: int) -> ClaimHint | None:
    """One claim as the worker makes it: ask for a hint, claim, record what came back."""
    hint = hints.get("q")
    hints.record("q", rows, limit, hint)
    return hint


def test_a_full_batch_leaves_a_hint_at_its_last_position_in_claim_order() -> None:
    hints = ClaimHints(1.0, clock=Clock())
    # Lowest priority last; within it the latest run_at, then the highest id.
    rows = [row(7, 5, 10.0), row(3, 0, 12.5), row(9, 0, 12.5), row(4, 0, 11.0), row(8, 5, 13.0)]
    assert claim(hints, rows, 5) is None
    assert hints.get("q") == ClaimHint(0, 12.5, 9)
    assert hints.get("other") is None


def test_a_short_batch_drops_the_hint_and_forget_drops_it_too() -> None:
    hints = ClaimHints(1.0, clock=Clock())
    claim(hints, [row(1, 0, 1.0), row(2, 0, 1.0)], 2)
    assert hints.get("q") is not None
    claim(hints, [row(3, 0, 1.0)], 2)
    assert hints.get("q") is None
    claim(hints, [row(4, 0, 1.0), row(5, 0, 1.0)], 2)
    assert hints.get("q") is not None
    hints.forget("q")  # e.g. the worker settled a keyed job of this queue
    assert hints.get("q") is None
    claim(hints, [], 2)
    assert hints.get("q") is None


def test_forget_during_a_claim_wins_over_what_that_claim_returns() -> None:
    hints = ClaimHints(1.0, clock=Clock())
    claim(hints, [row(1, 0, 1.0)], 1)
    hint = hints.get("q")
    assert hint is not None  # a hinted claim begins...
    hints.forget("q")  # ...a keyed job is settled meanwhile...
    hints.record("q", [row(2, 0, 1.0)], 1, hint)  # ...and the claim comes back full
    assert hints.get("q") is None
    claim(hints, [row(3, 0, 1.0)], 1)  # that scan from the start leaves a hint again
    assert hints.get("q") == ClaimHint(0, 1.0, 3)


def test_a_claim_from_the_start_happens_at_least_every_full_scan_seconds() -> None:
    clock = Clock()
    hints = ClaimHints(1.0, clock=clock)
    sent = []
    for _ in range(6):
        sent.append(claim(hints, [row(1, 0, 1.0)], 1))
        clock.now += 0.3
    # At 0.0 s from the start; hinted at 0.3, 0.6, 0.9; at 1.2 s from the start again.
    assert [hint is None for hint in sent] == [True, False, False, False, True, False]


def test_a_failed_claim_does_not_count_as_the_scan_from_the_start() -> None:
    clock = Clock()
    hints = ClaimHints(1.0, clock=clock)
    claim(hints, [row(1, 0, 1.0)], 1)
    clock.now += 1.5
    assert hints.get("q") is None  # due for a scan from the start...
    clock.now += 0.1  # ...which failed (no record()): the next claim is still one
    assert hints.get("q") is None


def test_zero_seconds_turns_hints_off_and_negative_is_refused() -> None:
    hints = ClaimHints(0.0, clock=Clock())
    claim(hints, [row(1, 0, 1.0)], 1)
    assert hints.get("q") is None
    with pytest.raises(ValueError, match="zero or more"):
        ClaimHints(-1.0)
