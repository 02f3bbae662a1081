"""Cron schedules: parse a cron expression and find the instants it matches."""

from __future__ import annotations

import calendar
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import MAXYEAR, MINYEAR, date, datetime, timedelta, tzinfo

LOOKBACK_YEARS = 5
"""How far back :meth:`CronSchedule.latest_at_or_before` searches: this many calendar years
before the moment's year, plus the part of that year up to the moment."""

# The Gregorian calendar repeats exactly every 400 years (146,097 days, a whole number of
# weeks), so a schedule that matches at all matches within 400 years of any moment.
_CALENDAR_CYCLE_YEARS = 400

_MACROS: Mapping[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_MONTH_NAMES: Mapping[str, int] = {
    name.upper(): number for number, name in enumerate(calendar.month_abbr) if name
}
_WEEKDAY_NAMES: Mapping[str, int] = {
    "SUN": 0,
    "MON": 1,
    "TUE": 2,
    "WED": 3,
    "THU": 4,
    "FRI": 5,
    "SAT": 6,
}
_SUNDAY_AS_SEVEN = 7

# February counts 29 days: a schedule for the 29th of February is rare, not impossible.
_LONGEST_MONTH_DAYS: Mapping[int, int] = {
    month: 29 if month == 2 else calendar.monthrange(2001, month)[1] for month in range(1, 13)
}

_FIELD_LAYOUT = (
    "expected 5 fields (minute hour day-of-month month day-of-week), 6 with a leading "
    "second field, or a macro such as @daily"
)


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    low: int
    high: int
    # The last distinct value: `*` and `a/n` step up to it. Only day-of-week differs from
    # `high`, because 7 is an alias of Sunday (0) and `1/2` must not pick up Sunday.
    last: int
    names: Mapping[str, int]
    names_hint: str

    @property
    def max_step(self) -> int:
        return self.last - self.low + 1


_SECOND = _FieldSpec("second", 0, 59, 59, {}, "")
_MINUTE = _FieldSpec("minute", 0, 59, 59, {}, "")
_HOUR = _FieldSpec("hour", 0, 23, 23, {}, "")
_DAY_OF_MONTH = _FieldSpec("day-of-month", 1, 31, 31, {}, "")
_MONTH = _FieldSpec("month", 1, 12, 12, _MONTH_NAMES, " or a month name JAN-DEC")
_DAY_OF_WEEK = _FieldSpec("day-of-week", 0, 7, 6, _WEEKDAY_NAMES, " or a weekday name SUN-SAT")
_FIELDS = (_SECOND, _MINUTE, _HOUR, _DAY_OF_MONTH, _MONTH, _DAY_OF_WEEK)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed cron expression; build it with :meth:`parse`.

    Syntax: five fields ``minute hour day-of-month month day-of-week``, or six with a leading
    ``second`` field. Each field is ``*``, a number, a range ``a-b``, a step ``*/n``, ``a-b/n``
    or ``a/n`` (``a`` up to the field's maximum), or a comma-separated list of those. Months
    accept ``JAN``-``DEC`` and weekdays ``SUN``-``SAT`` (any case); day-of-week 0 and 7 are
    both Sunday. The macros are ``@yearly``/``@annually``, ``@monthly``, ``@weekly``,
    ``@daily``/``@midnight`` and ``@hourly``.

    Days follow Vixie cron (and pg_cron): when the day-of-month and day-of-week fields are
    both restricted, a day matches if *either* matches (``0 0 13 * FRI`` runs on every 13th
    and every Friday); otherwise both must match, which in practice applies the restricted
    one. As in Vixie cron, a field that starts with ``*`` (``*/2`` included) counts as
    unrestricted for this rule, so ``0 0 */2 * MON`` means odd-numbered days that are Mondays.

    A schedule that can never run (``0 0 30 2 *``) is rejected by :meth:`parse`.

    Times are evaluated on the wall clock of the datetime passed in, and results carry its
    tzinfo. The worker passes UTC datetimes from the database clock, so daylight saving time
    never applies; with a DST zone, nonexistent or repeated local times are not adjusted.

    The expanded fields (``seconds`` ... ``days_of_week``, sorted, Sunday as 0) are kept for
    inspection; ``seconds`` is ``(0,)`` for five-field expressions.

    >>> CronSchedule.parse("*/15 9-17 * * MON-FRI")
    CronSchedule(expression='*/15 9-17 * * MON-FRI', has_seconds=False)
    """

    expression: str
    has_seconds: bool
    seconds: tuple[int, ...] = field(repr=False)
    minutes: tuple[int, ...] = field(repr=False)
    hours: tuple[int, ...] = field(repr=False)
    days_of_month: tuple[int, ...] = field(repr=False)
    months: tuple[int, ...] = field(repr=False)
    days_of_week: tuple[int, ...] = field(repr=False)
    matches_either_day_field: bool = field(repr=False)

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        """Parse a cron expression; raise ``ValueError`` naming the bad field and its range.

        >>> CronSchedule.parse("@hourly").minutes
        (0,)
        >>> CronSchedule.parse("61 * * * *")
        Traceback (most recent call last):
        ...
        ValueError: invalid cron expression '61 * * * *': minute field '61' out of range 0-59
        """
        text = expression.strip()
        if text.startswith("@"):
            macro = _MACROS.get(text.lower())
            if macro is None:
                raise ValueError(
                    f"invalid cron expression {expression!r}: unknown macro {text!r}; "
                    f"expected one of {', '.join(_MACROS)}"
                )
            text = macro
        parts = text.split()
        if len(parts) not in (5, 6):
            raise ValueError(
                f"invalid cron expression {expression!r}: {_FIELD_LAYOUT}; "
                f"got {len(parts)} field{'' if len(parts) == 1 else 's'}"
            )
        has_seconds = len(parts) == 6
        if not has_seconds:
            parts = ["0", *parts]
        second, minute, hour, day_of_month, month, day_of_week = (
            _parse_field(expression, spec, part) for spec, part in zip(_FIELDS, parts, strict=True)
        )
        day_of_week = tuple(sorted({value % _SUNDAY_AS_SEVEN for value in day_of_week}))
        matches_either_day_field = not parts[3].startswith("*") and not parts[5].startswith("*")
        if not matches_either_day_field and not any(
            day <= _LONGEST_MONTH_DAYS[number] for day in day_of_month for number in month
        ):
            raise ValueError(
                f"invalid cron expression {expression!r}: day-of-month field {parts[3]!r} "
                f"never occurs in month field {parts[4]!r}, so the schedule would never run"
            )
        return cls(
            expression=expression,
            has_seconds=has_seconds,
            seconds=second,
            minutes=minute,
            hours=hour,
            days_of_month=day_of_month,
            months=month,
            days_of_week=day_of_week,
            matches_either_day_field=matches_either_day_field,
        )

    def next_after(self, moment: datetime) -> datetime:
        """The first matching instant strictly after ``moment``, in ``moment``'s tzinfo.

        ``moment`` must be timezone-aware; it is truncated to whole seconds first. Raises
        ``ValueError`` only when no match fits before the year 9999.

        >>> from datetime import timezone
        >>> CronSchedule.parse("0 0 29 2 *").next_after(datetime(2026, 1, 1, tzinfo=timezone.utc))
        datetime.datetime(2028, 2, 29, 0, 0, tzinfo=datetime.timezone.utc)
        """
        zone = _require_aware(moment, "moment")
        try:
            start = moment.replace(tzinfo=None, microsecond=0) + timedelta(seconds=1)
        except OverflowError:
            raise ValueError(f"no datetime exists after {moment.isoformat()}") from None
        first_time_today = _first_at_or_after(
            self._time_fields, (start.hour, start.minute, start.second)
        )
        earliest_time = (self.hours[0], self.minutes[0], self.seconds[0])
        last_year = min(MAXYEAR, start.year + _CALENDAR_CYCLE_YEARS)
        for day in self._matching_dates(start.date(), is_forward=True, stop_year=last_year):
            if day != start.date():
                return _combine(day, earliest_time, zone)
            if first_time_today is not None:
                return _combine(day, first_time_today, zone)
        raise ValueError(
            f"cron schedule {self.expression!r} has no matching time after "
            f"{moment.isoformat()} up to the year {last_year}"
        )

    def latest_at_or_before(self, moment: datetime) -> datetime | None:
        """The last matching instant at or before ``moment``, in ``moment``'s tzinfo.

        ``moment`` must be timezone-aware; it is truncated to whole seconds first. The search
        goes back :data:`LOOKBACK_YEARS` calendar years; ``None`` if nothing matched then.

        >>> from datetime import timezone
        >>> moment = datetime(2026, 3, 1, 12, 34, 56, tzinfo=timezone.utc)
        >>> CronSchedule.parse("@daily").latest_at_or_before(moment)
        datetime.datetime(2026, 3, 1, 0, 0, tzinfo=datetime.timezone.utc)
        """
        zone = _require_aware(moment, "moment")
        end = moment.replace(tzinfo=None, microsecond=0)
        last_time_today = _last_at_or_before(self._time_fields, (end.hour, end.minute, end.second))
        latest_time = (self.hours[-1], self.minutes[-1], self.seconds[-1])
        first_year = max(MINYEAR, end.year - LOOKBACK_YEARS)
        for day in self._matching_dates(end.date(), is_forward=False, stop_year=first_year):
            if day != end.date():
                return _combine(day, latest_time, zone)
            if last_time_today is not None:
                return _combine(day, last_time_today, zone)
        return None

    def ticks_between(
        self, start_exclusive: datetime, end_inclusive: datetime, limit: int
    ) -> list[datetime]:
        """The matching instants in ``(start_exclusive, end_inclusive]``, earliest first.

        At most ``limit`` are returned, so a caller backfilling after downtime can tell
        that it was cut short (``len(result) == limit``) and decide to skip the rest.
        Results carry ``start_exclusive``'s tzinfo.

        >>> from datetime import timezone
        >>> start = datetime(2026, 1, 1, tzinfo=timezone.utc)
        >>> every_minute = CronSchedule.parse("* * * * *")
        >>> len(every_minute.ticks_between(start, start + timedelta(hours=1), limit=100))
        60
        """
        if limit < 0:
            raise ValueError(f"limit must be zero or more, got {limit}")
        _require_aware(start_exclusive, "start_exclusive")
        _require_aware(end_inclusive, "end_inclusive")
        ticks: list[datetime] = []
        tick = start_exclusive
        while len(ticks) < limit and tick < end_inclusive:
            tick = self.next_after(tick)
            if tick > end_inclusive:
                break
            ticks.append(tick)
        return ticks

    @property
    def _time_fields(self) -> tuple[tuple[int, ...], ...]:
        return (self.hours, self.minutes, self.seconds)

    def _is_matching_day(self, day: int, weekday: int) -> bool:
        in_day_of_month = day in self.days_of_month
        in_day_of_week = weekday in self.days_of_week
        if self.matches_either_day_field:
            return in_day_of_month or in_day_of_week
        return in_day_of_month and in_day_of_week

    def _matching_dates(self, origin: date, *, is_forward: bool, stop_year: int) -> Iterator[date]:
        """Matching dates from ``origin`` (included) towards ``stop_year`` (included)."""
        direction = 1 if is_forward else -1
        months = self.months if is_forward else self.months[::-1]
        for year in range(origin.year, stop_year + direction, direction):
            for month in months:
                if year == origin.year and (month - origin.month) * direction < 0:
                    continue
                first_weekday, length = calendar.monthrange(year, month)
                if (year, month) == (origin.year, origin.month):
                    first_day = origin.day
                else:
                    first_day = 1 if is_forward else length
                last_day = length if is_forward else 1
                for day in range(first_day, last_day + direction, direction):
                    # monthrange counts Monday as 0; cron counts Sunday as 0.
                    if self._is_matching_day(day, (first_weekday + day) % 7):
                        yield date(year, month, day)


def _require_aware(moment: datetime, name: str) -> tzinfo:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(
            f"{name} must be a timezone-aware datetime (use datetime.timezone.utc), got {moment!r}"
        )
    return moment.tzinfo


def _combine(day: date, time_of_day: Sequence[int], zone: tzinfo) -> datetime:
    hour, minute, second = time_of_day
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=zone)


def _first_at_or_after(
    fields: Sequence[tuple[int, ...]], floor: Sequence[int]
) -> tuple[int, ...] | None:
    """The smallest combination of field values that is >= ``floor``, compared in order."""
    if not fields:
        return ()
    values, rest = fields[0], fields[1:]
    for value in values[bisect_left(values, floor[0]) :]:
        if value > floor[0]:
            return (value, *(later[0] for later in rest))
        tail = _first_at_or_after(rest, floor[1:])
        if tail is not None:
            return (value, *tail)
    return None


def _last_at_or_before(
    fields: Sequence[tuple[int, ...]], ceiling: Sequence[int]
) -> tuple[int, ...] | None:
    """The largest combination of field values that is <= ``ceiling``, compared in order."""
    if not fields:
        return ()
    values, rest = fields[0], fields[1:]
    for value in reversed(values[: bisect_right(values, ceiling[0])]):
        if value < ceiling[0]:
            return (value, *(later[-1] for later in rest))
        tail = _last_at_or_before(rest, ceiling[1:])
        if tail is not None:
            return (value, *tail)
    return None


def _parse_field(expression: str, spec: _FieldSpec, text: str) -> tuple[int, ...]:
    values: set[int] = set()
    for part in text.split(","):
        values.update(_parse_part(expression, spec, text, part))
    return tuple(sorted(values))


def _parse_part(expression: str, spec: _FieldSpec, text: str, part: str) -> range:
    def invalid(token: str, problem: str) -> ValueError:
        subject = f"{spec.name} field {text!r}"
        if token != text:
            subject += f" part {token!r}"
        return ValueError(f"invalid cron expression {expression!r}: {subject} {problem}")

    if not part:
        raise invalid(text, "has an empty list item")
    base, has_step, step_text = part.partition("/")
    step = 1
    if has_step:
        if not (step_text.isascii() and step_text.isdigit()):
            raise invalid(part, f"has step {step_text!r}; a step is a number 1-{spec.max_step}")
        step = int(step_text)
        if not 1 <= step <= spec.max_step:
            raise invalid(part, f"has step {step}; a step is a number 1-{spec.max_step}")
    if base == "*":
        return range(spec.low, spec.last + 1, step)
    if "-" in base:
        first_text, _, last_text = base.partition("-")
        if not first_text or not last_text or "-" in last_text:
            raise invalid(base, f"is not a range a-b with {spec.low} <= a <= b <= {spec.high}")
        first = _parse_value(spec, first_text, invalid)
        last = _parse_value(spec, last_text, invalid)
        if spec is _DAY_OF_WEEK and last_text.upper() == "SUN" and first > 0:
            # `FRI-SUN` reads naturally: as the end of a range, Sunday is 7, not 0.
            last = _SUNDAY_AS_SEVEN
        if first > last:
            raise invalid(
                base, f"is a reversed range; write a-b with {spec.low} <= a <= b <= {spec.high}"
            )
        return range(first, last + 1, step)
    first = _parse_value(spec, base, invalid)
    values = range(first, (spec.last if has_step else first) + 1, step)
    if not values:
        raise invalid(part, f"matches nothing; start a step at {spec.low}-{spec.last}")
    return values


def _parse_value(spec: _FieldSpec, token: str, invalid: Callable[[str, str], ValueError]) -> int:
    named = spec.names.get(token.upper())
    if named is not None:
        return named
    if not (token.isascii() and token.isdigit()):
        raise invalid(token, f"is not a number {spec.low}-{spec.high}{spec.names_hint}")
    value = int(token)
    if not spec.low <= value <= spec.high:
        raise invalid(token, f"out of range {spec.low}-{spec.high}")
    return value
