"""CircuitBreaker: pure state transitions on an explicit clock."""

from __future__ import annotations

import pytest

from pgqueue.breaker import CircuitBreaker


def tripped(threshold: int = 3, cooldown: float = 2.0, at: float = 100.0) -> CircuitBreaker:
    breaker = CircuitBreaker(failure_threshold=threshold, cooldown_seconds=cooldown)
    for _ in range(threshold):
        breaker.record_failure(at)
    return breaker


def test_a_new_breaker_lets_deliveries_through() -> None:
    breaker = CircuitBreaker()
    assert breaker.state == "closed"
    assert breaker.allow(0.0) == (True, 0.0, False)
    assert breaker.allow() == (True, 0.0, False)  # the monotonic clock by default


def test_it_opens_after_threshold_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failure_threshold=3, cooldown_seconds=2.0)
    breaker.record_failure(10.0)
    breaker.record_failure(10.0)
    breaker.record_success()  # not consecutive any more
    breaker.record_failure(10.0)
    breaker.record_failure(10.0)
    assert breaker.state == "closed" and breaker.allow(10.0) == (True, 0.0, False)
    breaker.record_failure(10.0)
    assert breaker.state == "open"


def test_while_open_deliveries_are_held_back_for_the_rest_of_the_cooldown() -> None:
    breaker = tripped(cooldown=2.0, at=100.0)
    assert breaker.allow(100.0) == (False, 2.0, False)
    allowed, wait, _ = breaker.allow(101.5)
    assert not allowed and wait == pytest.approx(0.5)
    assert breaker.state == "open"


def test_after_the_cooldown_exactly_one_probe_goes_through() -> None:
    breaker = tripped(cooldown=2.0, at=100.0)
    assert breaker.allow(102.0) == (True, 0.0, True)
    assert breaker.state == "half_open"
    allowed, wait, _ = breaker.allow(102.1)
    assert not allowed and wait >= 0.5, "a second delivery waits for the probe's result"
    assert not breaker.allow(150.0)[0], "still waiting: the probe has not reported"


def test_a_successful_probe_closes_it_and_resets_the_cooldown() -> None:
    breaker = tripped(cooldown=2.0, at=100.0)
    assert breaker.allow(102.0)[0]
    assert breaker.record_success(is_probe=True)
    assert breaker.state == "closed" and breaker.failures == 0
    assert breaker.allow(102.0) == (True, 0.0, False)
    assert breaker.allow(102.0) == (True, 0.0, False)
    # Tripping again starts from the base cooldown, not the last one.
    for _ in range(3):
        breaker.record_failure(200.0)
    assert breaker.allow(200.0) == (False, 2.0, False)


def test_each_failed_probe_doubles_the_cooldown_up_to_the_cap() -> None:
    breaker = CircuitBreaker(failure_threshold=1, cooldown_seconds=2.0, max_cooldown_seconds=10.0)
    now = 0.0
    breaker.record_failure(now)
    cooldowns = []
    for _ in range(5):
        _, wait, _ = breaker.allow(now)
        cooldowns.append(wait)
        now += wait
        assert breaker.allow(now) == (True, 0.0, True), "the probe"
        assert breaker.record_failure(now, is_probe=True)
        assert breaker.state == "open"
    assert cooldowns == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_a_failed_probe_reopens_even_below_the_threshold() -> None:
    breaker = tripped(threshold=3, cooldown=1.0, at=0.0)
    breaker.failures = 0  # whatever the count, a failed probe means still down
    assert breaker.allow(1.0)[0]
    breaker.record_failure(1.0, is_probe=True)
    assert breaker.state == "open" and breaker.allow(1.0) == (False, 2.0, False)


def test_failures_of_deliveries_in_flight_when_it_opened_do_not_extend_the_cooldown() -> None:
    """The relay runs many deliveries to one sink at once: when a destination goes down, all
    of them fail at about the same time. The documented behaviour is one cooldown, growing
    only with failed probes."""
    breaker = CircuitBreaker(failure_threshold=5, cooldown_seconds=2.0)
    for _ in range(16):  # 16 deliveries in flight, all refused
        breaker.record_failure(100.0)
    assert breaker.allow(100.0) == (False, 2.0, False)


def test_an_older_delivery_failing_during_the_probe_does_not_decide() -> None:
    breaker = tripped(cooldown=2.0, at=100.0)
    assert breaker.allow(102.0) == (True, 0.0, True)
    assert not breaker.record_failure(102.1)  # not the probe
    assert breaker.state == "half_open"
    assert breaker.record_success(is_probe=True) and breaker.state == "closed"
