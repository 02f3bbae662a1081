"""Cron schedules: parsing, next and previous ticks, backfill ranges and error messages."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgqueue.cron import LOOKBACK_YEARS, CronSchedule


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=timezone.utc)


# January 2026 starts on a Thursday: Fri 2, Sat 3, Sun 4, Mon 5, Tue 13, Fri 16.
NEXT_AFTER_CASES = [
    # Every field form on the minute field.
    ("* * * * *", utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 0, 1)),
    ("5 * * * *", utc(2026, 1, 1, 10, 5), utc(2026, 1, 1, 11, 5)),
    ("5 * * * *", utc(2026, 1, 1, 10, 4, 59), utc(2026, 1, 1, 10, 5)),
    ("10-12 * * * *", utc(2026, 1, 1, 10, 11), utc(2026, 1, 1, 10, 12)),
    ("10-12 * * * *", utc(2026, 1, 1, 10, 12), utc(2026, 1, 1, 11, 10)),
    ("*/15 * * * *", utc(2026, 1, 1, 10, 7), utc(2026, 1, 1, 10, 15)),
    ("*/15 * * * *", utc(2026, 1, 1, 10, 45), utc(2026, 1, 1, 11, 0)),
    ("10-30/10 * * * *", utc(2026, 1, 1, 10, 20), utc(2026, 1, 1, 10, 30)),
    ("10-30/10 * * * *", utc(2026, 1, 1, 10, 30), utc(2026, 1, 1, 11, 10)),
    ("30/15 * * * *", utc(2026, 1, 1, 10, 31), utc(2026, 1, 1, 10, 45)),
    ("30/15 * * * *", utc(2026, 1, 1, 10, 46), utc(2026, 1, 1, 11, 30)),
    ("1,2,40-42 * * * *", utc(2026, 1, 1, 10, 2), utc(2026, 1, 1, 10, 40)),
    ("1,2,40-42 * * * *", utc(2026, 1, 1, 10, 42), utc(2026, 1, 1, 11, 1)),
    # Hours, days of the month, months.
    ("0 9-17/4 * * *", utc(2026, 1, 1, 9, 0), utc(2026, 1, 1, 13, 0)),
    ("0 9-17/4 * * *", utc(2026, 1, 1, 17, 0), utc(2026, 1, 2, 9, 0)),
    ("30 2 * * *", utc(2026, 1, 1, 2, 30), utc(2026, 1, 2, 2, 30)),
    ("0 0 1 * *", utc(2026, 1, 15), utc(2026, 2, 1)),
    ("0 0 1 */3 *", utc(2026, 1, 1), utc(2026, 4, 1)),
    ("0 0 1 */3 *", utc(2026, 10, 1), utc(2027, 1, 1)),
    ("0 0 * JUL,jan *", utc(2026, 1, 31, 12), utc(2026, 7, 1)),
    ("0 0 1 feb-Apr *", utc(2026, 4, 1), utc(2027, 2, 1)),
    # Weekdays: numbers, names in any case, 7 as Sunday, ranges that end on Sunday.
    ("0 0 * * MON-FRI", utc(2026, 1, 2, 12), utc(2026, 1, 5)),
    ("0 0 * * sat,Sun", utc(2026, 1, 1), utc(2026, 1, 3)),
    ("0 0 * * 0", utc(2026, 1, 1), utc(2026, 1, 4)),
    ("0 0 * * 7", utc(2026, 1, 1), utc(2026, 1, 4)),
    ("0 0 * * FRI-SUN", utc(2026, 1, 5), utc(2026, 1, 9)),
    ("0 0 * * 5-7", utc(2026, 1, 4), utc(2026, 1, 9)),
    ("0 0 * * 1/2", utc(2026, 1, 5), utc(2026, 1, 7)),
    # Month ends, leap years and year rollover.
    ("0 0 31 * *", utc(2026, 1, 31), utc(2026, 3, 31)),
    ("0 0 30 * *", utc(2026, 2, 1), utc(2026, 3, 30)),
    ("0 0 29 2 *", utc(2026, 1, 1), utc(2028, 2, 29)),
    ("0 0 29 2 *", utc(2096, 3, 1), utc(2104, 2, 29)),
    ("0 0 1 1 *", utc(2026, 6, 1), utc(2027, 1, 1)),
    ("59 23 31 12 *", utc(2026, 12, 31, 23, 59), utc(2027, 12, 31, 23, 59)),
    ("* * * * *", utc(2026, 12, 31, 23, 59, 30), utc(2027, 1, 1, 0, 0)),
    # Day-of-month and day-of-week both restricted: either one is enough.
    ("0 0 13 * FRI", utc(2026, 1, 1), utc(2026, 1, 2)),
    ("0 0 13 * FRI", utc(2026, 1, 10), utc(2026, 1, 13)),
    ("0 0 13 * FRI", utc(2026, 1, 13), utc(2026, 1, 16)),
    ("0 0 30 2 MON", utc(2026, 2, 1), utc(2026, 2, 2)),
    # Only one restricted: that one applies.
    ("0 0 13 * *", utc(2026, 1, 1), utc(2026, 1, 13)),
    ("0 0 * * FRI", utc(2026, 1, 2), utc(2026, 1, 9)),
    # A field starting with `*` counts as unrestricted (Vixie cron): odd days AND Mondays.
    ("0 0 */2 * MON", utc(2026, 1, 1), utc(2026, 1, 5)),
    ("0 0 */2 * MON", utc(2026, 1, 5), utc(2026, 1, 19)),
    # February 29th on a weekend (Sun or Sat): 2028-02-29 is a Tuesday, 2032-02-29 a Sunday.
    ("0 0 29 2 */6", utc(2026, 1, 1), utc(2032, 2, 29)),
    # Six fields: a leading second field.
    ("*/5 * * * * *", utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 1, 0, 0, 5)),
    ("*/5 * * * * *", utc(2026, 1, 1, 0, 0, 57), utc(2026, 1, 1, 0, 1, 0)),
    ("30 * * * * *", utc(2026, 1, 1, 0, 0, 30), utc(2026, 1, 1, 0, 1, 30)),
    ("0 0 0 * * *", utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 2)),
    ("59 59 23 31 12 *", utc(2026, 12, 31, 23, 59, 59), utc(2027, 12, 31, 23, 59, 59)),
    # Sub-second input: truncated to the second, then strictly after.
    ("*/5 * * * * *", utc(2026, 1, 1, 0, 0, 4, 999_999), utc(2026, 1, 1, 0, 0, 5)),
    ("*/5 * * * * *", utc(2026, 1, 1, 0, 0, 5, 500_000), utc(2026, 1, 1, 0, 0, 10)),
    ("* * * * *", utc(2026, 1, 1, 0, 0, 0, 1), utc(2026, 1, 1, 0, 1)),
    # Macros.
    ("@hourly", utc(2026, 1, 1, 10, 30), utc(2026, 1, 1, 11, 0)),
    ("@daily", utc(2026, 1, 1, 10, 30), utc(2026, 1, 2)),
    ("@midnight", utc(2026, 1, 1), utc(2026, 1, 2)),
    ("@weekly", utc(2026, 1, 1), utc(2026, 1, 4)),
    ("@monthly", utc(2026, 1, 31), utc(2026, 2, 1)),
    ("@yearly", utc(2026, 1, 1), utc(2027, 1, 1)),
    ("@ANNUALLY", utc(2026, 6, 1), utc(2027, 1, 1)),
]


@pytest.mark.parametrize(("expression", "moment", "expected"), NEXT_AFTER_CASES)
def test_next_after(expression: str, moment: datetime, expected: datetime) -> None:
    assert CronSchedule.parse(expression).next_after(moment) == expected


@pytest.mark.parametrize(("expression", "moment", "expected"), NEXT_AFTER_CASES)
def test_latest_at_or_before_mirrors_next_after(
    expression: str, moment: datetime, expected: datetime
) -> None:
    schedule = CronSchedule.parse(expression)
    assert schedule.latest_at_or_before(expected) == expected
    one_second_earlier = schedule.latest_at_or_before(expected - timedelta(seconds=1))
    if one_second_earlier is None:
        # Only when the previous tick is older than the lookback (rare leap-day schedules).
        just_before_lookback = utc(expected.year - LOOKBACK_YEARS, 1, 1) - timedelta(seconds=1)
        assert schedule.ticks_between(just_before_lookback, expected, limit=2) == [expected]
        return
    assert one_second_earlier <= moment
    assert schedule.next_after(one_second_earlier) == expected


LATEST_CASES = [
    ("*/15 * * * *", utc(2026, 1, 1, 10, 7), utc(2026, 1, 1, 10, 0)),
    ("*/15 * * * *", utc(2026, 1, 1, 10, 15), utc(2026, 1, 1, 10, 15)),
    ("*/15 * * * *", utc(2026, 1, 1, 10, 15, 0, 999), utc(2026, 1, 1, 10, 15)),
    ("*/15 * * * *", utc(2026, 1, 1, 0, 14, 59), utc(2026, 1, 1, 0, 0)),
    ("*/15 1-23 * * *", utc(2026, 1, 1, 0, 59, 59), utc(2025, 12, 31, 23, 45)),
    ("0 9-17/4 * * *", utc(2026, 1, 1, 8, 59), utc(2025, 12, 31, 17, 0)),
    ("0 0 31 * *", utc(2026, 3, 30), utc(2026, 1, 31)),
    ("0 0 29 2 *", utc(2026, 1, 1), utc(2024, 2, 29)),
    ("0 0 13 * FRI", utc(2026, 1, 15), utc(2026, 1, 13)),
    ("0 0 * * MON-FRI", utc(2026, 1, 4, 23, 59), utc(2026, 1, 2)),
    ("*/5 * * * * *", utc(2026, 1, 1, 0, 0, 4), utc(2026, 1, 1, 0, 0, 0)),
    ("*/5 * * * * *", utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 1, 0, 0, 0)),
    ("@yearly", utc(2026, 12, 31, 23, 59, 59), utc(2026, 1, 1)),
    ("@monthly", utc(2026, 1, 1), utc(2026, 1, 1)),
]


@pytest.mark.parametrize(("expression", "moment", "expected"), LATEST_CASES)
def test_latest_at_or_before(expression: str, moment: datetime, expected: datetime) -> None:
    schedule = CronSchedule.parse(expression)
    assert schedule.latest_at_or_before(moment) == expected
    assert schedule.next_after(expected) > moment


def test_latest_at_or_before_gives_up_after_the_lookback() -> None:
    # February 29th on a Saturday or Sunday: 2032, then 2004 before it.
    schedule = CronSchedule.parse("0 0 29 2 */6")
    assert schedule.latest_at_or_before(utc(2032, 3, 1)) == utc(2032, 2, 29)
    assert LOOKBACK_YEARS < 2026 - 2004
    assert schedule.latest_at_or_before(utc(2026, 1, 1)) is None


TICKS_CASES = [
    ("* * * * *", utc(2026, 1, 1, 10), utc(2026, 1, 1, 11), 60),
    ("*/5 * * * * *", utc(2026, 1, 1, 10), utc(2026, 1, 1, 10, 1), 12),
    ("*/15 * * * *", utc(2026, 1, 1), utc(2026, 1, 2), 96),
    ("@hourly", utc(2026, 1, 1), utc(2026, 1, 8), 168),
    ("@daily", utc(2026, 1, 1), utc(2027, 1, 1), 365),
    ("@daily", utc(2028, 1, 1), utc(2029, 1, 1), 366),
    ("0 0 * * MON-FRI", utc(2026, 1, 1), utc(2026, 2, 1), 21),
    # 53 Fridays (2027-01-01 is one) + 12 thirteenths - 3 Friday the 13ths (Feb, Mar, Nov).
    ("0 0 13 * FRI", utc(2026, 1, 1), utc(2027, 1, 1), 53 + 12 - 3),
    ("0 0 29 2 *", utc(2000, 1, 1), utc(2100, 12, 31), 25),
]


@pytest.mark.parametrize(("expression", "start", "end", "count"), TICKS_CASES)
def test_ticks_between_counts(expression: str, start: datetime, end: datetime, count: int) -> None:
    ticks = CronSchedule.parse(expression).ticks_between(start, end, limit=10_000)
    assert len(ticks) == count
    assert ticks == sorted(set(ticks))
    assert all(start < tick <= end for tick in ticks)


def test_ticks_between_excludes_start_and_includes_end() -> None:
    schedule = CronSchedule.parse("0 * * * *")
    assert schedule.ticks_between(utc(2026, 1, 1, 10), utc(2026, 1, 1, 12), limit=10) == [
        utc(2026, 1, 1, 11),
        utc(2026, 1, 1, 12),
    ]


def test_ticks_between_stops_at_the_limit_with_the_earliest_ticks() -> None:
    schedule = CronSchedule.parse("* * * * *")
    ticks = schedule.ticks_between(utc(2026, 1, 1), utc(2026, 1, 2), limit=3)
    assert ticks == [utc(2026, 1, 1, 0, 1), utc(2026, 1, 1, 0, 2), utc(2026, 1, 1, 0, 3)]


@pytest.mark.parametrize(
    ("start", "end", "limit"),
    [
        (utc(2026, 1, 1), utc(2026, 1, 2), 0),
        (utc(2026, 1, 2), utc(2026, 1, 1), 10),
        (utc(2026, 1, 1), utc(2026, 1, 1), 10),
        (utc(2026, 1, 1, 0, 0, 1), utc(2026, 1, 1, 0, 0, 59), 10),
    ],
)
def test_ticks_between_empty(start: datetime, end: datetime, limit: int) -> None:
    assert CronSchedule.parse("* * * * *").ticks_between(start, end, limit) == []


def test_ticks_between_rejects_a_negative_limit() -> None:
    with pytest.raises(ValueError, match="limit must be zero or more, got -1"):
        CronSchedule.parse("* * * * *").ticks_between(utc(2026, 1, 1), utc(2026, 1, 2), -1)


# Each schedule against a predicate written from its plain-English meaning, checked minute by
# minute (second by second for six fields) over a window with a leap day and month ends.
BRUTE_FORCE_CASES: list[tuple[str, Callable[[datetime], bool]]] = [
    (
        "*/15 9-17 * * MON-FRI",
        lambda t: t.minute % 15 == 0 and 9 <= t.hour <= 17 and t.weekday() < 5,
    ),
    ("0 0 13 * FRI", lambda t: (t.hour, t.minute) == (0, 0) and (t.day == 13 or t.weekday() == 4)),
    ("30 6 29-31 * *", lambda t: (t.hour, t.minute) == (6, 30) and t.day >= 29),
    (
        "0 */6 * FEB,MAR SUN",
        lambda t: t.minute == 0 and t.hour % 6 == 0 and t.month in {2, 3} and t.weekday() == 6,
    ),
    ("5,55 23 1-7 * *", lambda t: (t.hour, t.minute) in {(23, 5), (23, 55)} and t.day <= 7),
    ("0 12 */10 * *", lambda t: (t.hour, t.minute) == (12, 0) and t.day in {1, 11, 21, 31}),
    ("0 0 1-7 * MON", lambda t: (t.hour, t.minute) == (0, 0) and (t.day <= 7 or t.weekday() == 0)),
    (
        "0 0 */2 * MON",
        lambda t: (t.hour, t.minute) == (0, 0) and t.day % 2 == 1 and t.weekday() == 0,
    ),
]


@pytest.mark.parametrize(("expression", "predicate"), BRUTE_FORCE_CASES)
def test_matches_a_brute_force_scan(expression: str, predicate: Callable[[datetime], bool]) -> None:
    start, end = utc(2028, 1, 25), utc(2028, 3, 8)
    expected = []
    moment = start + timedelta(minutes=1)
    while moment <= end:
        if predicate(moment):
            expected.append(moment)
        moment += timedelta(minutes=1)
    assert CronSchedule.parse(expression).ticks_between(start, end, limit=100_000) == expected


def test_six_fields_match_a_brute_force_scan() -> None:
    start, end = utc(2026, 12, 31, 23, 50), utc(2027, 1, 1, 0, 10)
    expected = []
    moment = start + timedelta(seconds=1)
    while moment <= end:
        if moment.second in {0, 20, 21, 22, 45} and moment.minute % 7 == 0:
            expected.append(moment)
        moment += timedelta(seconds=1)
    schedule = CronSchedule.parse("0,20-22,45 */7 * * * *")
    assert schedule.ticks_between(start, end, limit=100_000) == expected


EXPRESSIONS = [expression for expression, _, _ in NEXT_AFTER_CASES] + [
    "0 0 29 2 1",
    "0,30 8-18/2 1,15 * 1-5",
    "7 3 */5 JAN-MAR,OCT *",
]
MOMENTS = st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2090, 12, 31)).map(
    lambda moment: moment.replace(tzinfo=timezone.utc)
)


@settings(max_examples=300, deadline=None)
@given(expression=st.sampled_from(EXPRESSIONS), moment=MOMENTS)
def test_next_and_latest_are_consistent(expression: str, moment: datetime) -> None:
    schedule = CronSchedule.parse(expression)
    following = schedule.next_after(moment)
    assert following > moment
    assert following.microsecond == 0
    assert schedule.latest_at_or_before(following) == following
    # Nothing matches strictly between the moment and the next tick.
    previous = schedule.latest_at_or_before(following - timedelta(seconds=1))
    assert previous is None or previous <= moment
    if previous is not None:
        assert schedule.next_after(previous) == following
        assert schedule.latest_at_or_before(moment) == previous


def test_results_keep_the_moment_timezone_and_use_its_wall_clock() -> None:
    plus_two = timezone(timedelta(hours=2))
    schedule = CronSchedule.parse("0 9 * * *")
    following = schedule.next_after(datetime(2026, 1, 1, 8, 0, tzinfo=plus_two))
    assert following == datetime(2026, 1, 1, 9, 0, tzinfo=plus_two)
    assert following.tzinfo is plus_two
    assert schedule.latest_at_or_before(datetime(2026, 1, 1, 8, 0, tzinfo=plus_two)) == (
        datetime(2025, 12, 31, 9, 0, tzinfo=plus_two)
    )
    ticks = schedule.ticks_between(datetime(2026, 1, 1, tzinfo=plus_two), utc(2026, 1, 3), limit=10)
    assert ticks == [
        datetime(2026, 1, 1, 9, tzinfo=plus_two),
        datetime(2026, 1, 2, 9, tzinfo=plus_two),
    ]


@pytest.mark.parametrize(
    "call",
    [
        lambda schedule: schedule.next_after(datetime(2026, 1, 1)),
        lambda schedule: schedule.latest_at_or_before(datetime(2026, 1, 1)),
        lambda schedule: schedule.ticks_between(datetime(2026, 1, 1), utc(2026, 1, 2), 10),
        lambda schedule: schedule.ticks_between(utc(2026, 1, 1), datetime(2026, 1, 2), 10),
    ],
)
def test_naive_datetimes_are_rejected(call: Callable[[CronSchedule], object]) -> None:
    with pytest.raises(ValueError, match="must be a timezone-aware datetime"):
        call(CronSchedule.parse("* * * * *"))


def test_next_after_at_the_end_of_time_raises() -> None:
    with pytest.raises(ValueError, match="no matching time after"):
        CronSchedule.parse("0 0 1 1 *").next_after(utc(9999, 6, 1))


@pytest.mark.parametrize(
    ("macro", "equivalent"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        ("  @Daily  ", "0 0 * * *"),
    ],
)
def test_macros_expand_to_their_five_field_form(macro: str, equivalent: str) -> None:
    schedule = CronSchedule.parse(macro)
    assert schedule.expression == macro
    assert not schedule.has_seconds
    assert dataclasses.replace(schedule, expression=equivalent) == CronSchedule.parse(equivalent)


@pytest.mark.parametrize(
    ("expression", "field", "values"),
    [
        ("* * * * *", "minutes", tuple(range(60))),
        ("0-7 * * * *", "minutes", (0, 1, 2, 3, 4, 5, 6, 7)),
        ("*/20 * * * *", "minutes", (0, 20, 40)),
        ("50/4 * * * *", "minutes", (50, 54, 58)),
        ("1-10/3,30 * * * *", "minutes", (1, 4, 7, 10, 30)),
        ("5,5,1-5 * * * *", "minutes", (1, 2, 3, 4, 5)),
        ("0 */8 * * *", "hours", (0, 8, 16)),
        ("0 0 */10 * *", "days_of_month", (1, 11, 21, 31)),
        ("0 0 1 jan,MAR-may,12 *", "months", (1, 3, 4, 5, 12)),
        ("0 0 1 */5 *", "months", (1, 6, 11)),
        ("0 0 * * *", "days_of_week", (0, 1, 2, 3, 4, 5, 6)),
        ("0 0 * * 0-7", "days_of_week", (0, 1, 2, 3, 4, 5, 6)),
        ("0 0 * * 7", "days_of_week", (0,)),
        ("0 0 * * SUN-SUN", "days_of_week", (0,)),
        ("0 0 * * fri-sun", "days_of_week", (0, 5, 6)),
        ("0 0 * * */2", "days_of_week", (0, 2, 4, 6)),
        ("0 0 * * MON/2", "days_of_week", (1, 3, 5)),
        ("* * * * *", "seconds", (0,)),
        ("*/10 * * * * *", "seconds", (0, 10, 20, 30, 40, 50)),
    ],
)
def test_fields_expand(expression: str, field: str, values: tuple[int, ...]) -> None:
    assert getattr(CronSchedule.parse(expression), field) == values


@pytest.mark.parametrize(
    ("expression", "is_either"),
    [
        ("0 0 13 * FRI", True),
        ("0 0 1-31 * MON", True),
        ("0 0 13 * *", False),
        ("0 0 * * FRI", False),
        ("0 0 */2 * MON", False),
        ("0 0 13 * */2", False),
        ("@weekly", False),
    ],
)
def test_day_rule(expression: str, is_either: bool) -> None:
    assert CronSchedule.parse(expression).matches_either_day_field is is_either


def test_attributes() -> None:
    five = CronSchedule.parse("*/5 * * * *")
    six = CronSchedule.parse("*/5 * * * * *")
    assert (five.expression, five.has_seconds) == ("*/5 * * * *", False)
    assert (six.expression, six.has_seconds) == ("*/5 * * * * *", True)
    assert repr(five) == "CronSchedule(expression='*/5 * * * *', has_seconds=False)"
    assert CronSchedule.parse("\t0  12 * *   * ").hours == (12,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        five.expression = "@daily"  # type: ignore[misc]


LAYOUT = (
    "expected 5 fields (minute hour day-of-month month day-of-week), 6 with a leading "
    "second field, or a macro such as @daily"
)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", f"invalid cron expression '': {LAYOUT}; got 0 fields"),
        ("   ", f"invalid cron expression '   ': {LAYOUT}; got 0 fields"),
        ("*", f"invalid cron expression '*': {LAYOUT}; got 1 field"),
        ("* * * *", f"invalid cron expression '* * * *': {LAYOUT}; got 4 fields"),
        ("* * * * * * *", f"invalid cron expression '* * * * * * *': {LAYOUT}; got 7 fields"),
        (
            "61 * * * *",
            "invalid cron expression '61 * * * *': minute field '61' out of range 0-59",
        ),
        (
            "60 * * * * *",
            "invalid cron expression '60 * * * * *': second field '60' out of range 0-59",
        ),
        ("* 24 * * *", "invalid cron expression '* 24 * * *': hour field '24' out of range 0-23"),
        (
            "* * 0 * *",
            "invalid cron expression '* * 0 * *': day-of-month field '0' out of range 1-31",
        ),
        (
            "* * 32 * *",
            "invalid cron expression '* * 32 * *': day-of-month field '32' out of range 1-31",
        ),
        ("* * * 13 *", "invalid cron expression '* * * 13 *': month field '13' out of range 1-12"),
        ("* * * 0 *", "invalid cron expression '* * * 0 *': month field '0' out of range 1-12"),
        (
            "* * * * 8",
            "invalid cron expression '* * * * 8': day-of-week field '8' out of range 0-7",
        ),
        (
            "1,61 * * * *",
            "invalid cron expression '1,61 * * * *': minute field '1,61' part '61' "
            "out of range 0-59",
        ),
        (
            "5-61 * * * *",
            "invalid cron expression '5-61 * * * *': minute field '5-61' part '61' "
            "out of range 0-59",
        ),
        (
            "*/0 * * * *",
            "invalid cron expression '*/0 * * * *': minute field '*/0' has step 0; "
            "a step is a number 1-60",
        ),
        (
            "* */25 * * *",
            "invalid cron expression '* */25 * * *': hour field '*/25' has step 25; "
            "a step is a number 1-24",
        ),
        (
            "*/x * * * *",
            "invalid cron expression '*/x * * * *': minute field '*/x' has step 'x'; "
            "a step is a number 1-60",
        ),
        (
            "*/ * * * *",
            "invalid cron expression '*/ * * * *': minute field '*/' has step ''; "
            "a step is a number 1-60",
        ),
        (
            "5-1 * * * *",
            "invalid cron expression '5-1 * * * *': minute field '5-1' is a reversed range; "
            "write a-b with 0 <= a <= b <= 59",
        ),
        (
            "0 0 * * FRI-MON",
            "invalid cron expression '0 0 * * FRI-MON': day-of-week field 'FRI-MON' is a "
            "reversed range; write a-b with 0 <= a <= b <= 7",
        ),
        (
            "-1 * * * *",
            "invalid cron expression '-1 * * * *': minute field '-1' is not a range a-b "
            "with 0 <= a <= b <= 59",
        ),
        (
            "1-2-3 * * * *",
            "invalid cron expression '1-2-3 * * * *': minute field '1-2-3' is not a range a-b "
            "with 0 <= a <= b <= 59",
        ),
        (
            "1,,2 * * * *",
            "invalid cron expression '1,,2 * * * *': minute field '1,,2' has an empty list item",
        ),
        (
            "* * * FOO *",
            "invalid cron expression '* * * FOO *': month field 'FOO' is not a number 1-12 "
            "or a month name JAN-DEC",
        ),
        (
            "* * * * FUN",
            "invalid cron expression '* * * * FUN': day-of-week field 'FUN' is not a number "
            "0-7 or a weekday name SUN-SAT",
        ),
        (
            "JAN * * * *",
            "invalid cron expression 'JAN * * * *': minute field 'JAN' is not a number 0-59",
        ),
        (
            "* * * MON *",
            "invalid cron expression '* * * MON *': month field 'MON' is not a number 1-12 "
            "or a month name JAN-DEC",
        ),
        (
            "1.5 * * * *",
            "invalid cron expression '1.5 * * * *': minute field '1.5' is not a number 0-59",
        ),
        (
            "0 0 * * 7/2",
            "invalid cron expression '0 0 * * 7/2': day-of-week field '7/2' matches nothing; "
            "start a step at 0-6",
        ),
        (
            "@reboot",
            "invalid cron expression '@reboot': unknown macro '@reboot'; expected one of "
            "@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly",
        ),
        (
            "@daily 5",
            "invalid cron expression '@daily 5': unknown macro '@daily 5'; expected one of "
            "@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly",
        ),
        (
            "0 0 30 2 *",
            "invalid cron expression '0 0 30 2 *': day-of-month field '30' never occurs in "
            "month field '2', so the schedule would never run",
        ),
        (
            "0 0 31 4,6,9,11 *",
            "invalid cron expression '0 0 31 4,6,9,11 *': day-of-month field '31' never "
            "occurs in month field '4,6,9,11', so the schedule would never run",
        ),
        (
            "0 0 31 2 */2",
            "invalid cron expression '0 0 31 2 */2': day-of-month field '31' never occurs in "
            "month field '2', so the schedule would never run",
        ),
    ],
)
def test_invalid_expressions(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        CronSchedule.parse(expression)
