"""A circuit breaker per sink: stop hammering a failing destination, probe before resuming."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


@dataclass
class CircuitBreaker:
    """Closed: deliveries flow. After ``failure_threshold`` consecutive transient failures
    it opens for ``cooldown_seconds`` (doubling on each failed probe, up to
    ``max_cooldown_seconds``). Then one probe delivery is let through (half-open): success
    closes it, failure opens it again.

    >>> breaker = CircuitBreaker(failure_threshold=2)
    >>> breaker.allow(0.0)
    (True, 0.0)
    """

    failure_threshold: int = 5
    cooldown_seconds: float = 2.0
    max_cooldown_seconds: float = 120.0
    state: BreakerState = "closed"
    failures: int = 0
    opened_until: float = 0.0
    current_cooldown: float = field(default=0.0)
    probe_in_flight: bool = False

    def allow(self, now: float | None = None) -> tuple[bool, float]:
        """Whether a delivery may start now, else how many seconds to hold it back."""
        now = time.monotonic() if now is None else now
        if self.state == "closed":
            return True, 0.0
        if self.state == "open" and now < self.opened_until:
            return False, self.opened_until - now
        if self.probe_in_flight:
            return False, max(0.5, self.current_cooldown / 4)
        self.state = "half_open"
        self.probe_in_flight = True
        return True, 0.0

    def record_success(self) -> None:
        self.state = "closed"
        self.failures = 0
        self.current_cooldown = 0.0
        self.probe_in_flight = False

    def record_failure(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.failure_threshold:
            grown = self.current_cooldown * 2 if self.current_cooldown else self.cooldown_seconds
            self.current_cooldown = min(self.max_cooldown_seconds, grown)
            self.state = "open"
            self.opened_until = now + self.current_cooldown
            self.probe_in_flight = False
