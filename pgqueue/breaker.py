"""A circuit breaker per sink: stop hammering a failing destination, probe before resuming."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


@dataclass
class CircuitBreaker:
    """Closed: deliveries flow. After ``failure_threshold`` consecutive transient failures
    it opens for ``cooldown_seconds``. Then exactly one delivery goes through as a probe
    (half-open): its success closes the breaker, its failure opens it again for twice as
    long (up to ``max_cooldown_seconds``). Failures of deliveries that were already in
    flight when the breaker opened change nothing: they are the same outage.

    >>> breaker = CircuitBreaker(failure_threshold=2)
    >>> breaker.allow(0.0)
    (True, 0.0, False)
    """

    failure_threshold: int = 5
    cooldown_seconds: float = 2.0
    max_cooldown_seconds: float = 120.0
    state: BreakerState = "closed"
    failures: int = 0
    opened_until: float = 0.0
    current_cooldown: float = 0.0
    probe_in_flight: bool = False

    def allow(self, now: float | None = None) -> tuple[bool, float, bool]:
        """``(allowed, seconds to hold back, is_probe)`` for a delivery about to start."""
        now = time.monotonic() if now is None else now
        if self.state == "closed":
            return True, 0.0, False
        if self.state == "open" and now < self.opened_until:
            return False, self.opened_until - now, False
        if self.probe_in_flight:
            return False, max(0.5, self.current_cooldown / 4), False
        self.state = "half_open"
        self.probe_in_flight = True
        return True, 0.0, True

    def record_success(self, *, is_probe: bool = False) -> bool:
        """The destination accepted a delivery; returns True when this closed the breaker."""
        was_open = self.state != "closed"
        self.state = "closed"
        self.failures = 0
        self.current_cooldown = 0.0
        self.probe_in_flight = False
        return was_open

    def record_failure(self, now: float | None = None, *, is_probe: bool = False) -> bool:
        """A transient failure; returns True when this (re)opened the breaker."""
        now = time.monotonic() if now is None else now
        if self.state == "half_open":
            if not is_probe:
                return False  # an older delivery: the probe decides
            self.probe_in_flight = False
            self.current_cooldown = min(self.max_cooldown_seconds, self.current_cooldown * 2)
            self.state = "open"
            self.opened_until = now + self.current_cooldown
            return True
        if self.state == "open":
            return False
        self.failures += 1
        if self.failures < self.failure_threshold:
            return False
        self.current_cooldown = min(self.max_cooldown_seconds, self.cooldown_seconds)
        self.state = "open"
        self.opened_until = now + self.current_cooldown
        return True
