"""Backoff policies: pure functions from an attempt number to a delay in seconds."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter and a cap.

    The delay before attempt ``n + 1`` (after ``n`` failed attempts) is drawn uniformly
    from ``[0, min(max_seconds, base_seconds * multiplier ** (n - 1))]``; with
    ``jitter=False`` it is the upper bound itself. The delay is added to the database
    clock (``now()``) by the SQL that schedules the retry, never to the worker's clock.

    >>> RetryPolicy(base_seconds=2, jitter=False).delay_seconds(3)
    8.0
    """

    base_seconds: float = 1.0
    multiplier: float = 2.0
    max_seconds: float = 3600.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if not self.base_seconds >= 0:
            raise ValueError("base_seconds must be >= 0")
        if not self.multiplier >= 1:
            raise ValueError("multiplier must be >= 1")
        if not self.max_seconds >= 0:
            raise ValueError("max_seconds must be >= 0")

    def ceiling_seconds(self, failed_attempts: int) -> float:
        """Upper bound of the delay after ``failed_attempts`` (1 or more) failures."""
        exponent = max(0, failed_attempts - 1)
        # Compare in log space's cheap cousin: stop growing once past the cap.
        ceiling = self.base_seconds
        for _ in range(min(exponent, 64)):
            ceiling *= self.multiplier
            if ceiling >= self.max_seconds:
                return self.max_seconds
        return min(ceiling, self.max_seconds)

    def delay_seconds(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        """The delay to wait after ``failed_attempts`` failures."""
        ceiling = self.ceiling_seconds(failed_attempts)
        if not self.jitter:
            return ceiling
        return (rng or random).uniform(0.0, ceiling)


DEFAULT_RETRY_POLICY = RetryPolicy()
