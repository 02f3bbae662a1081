"""What happens to a job after its handler ran: pure rules, no I/O."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Literal

from pgqueue.errors import Cancel, NonRetryable, Retry, Snooze
from pgqueue.retry import RetryPolicy

MAX_ERROR_CHARS = 8192

OutcomeKind = Literal["complete", "retry", "snooze", "fail", "release"]


@dataclass(frozen=True)
class Outcome:
    """The decision for one job. ``reason`` says why a job is dead-lettered."""

    kind: OutcomeKind
    delay_seconds: float = 0.0
    reason: str = ""
    error: str | None = None
    blocks_key: bool = True


COMPLETE = Outcome("complete")
RELEASE = Outcome("release")


def format_error(exc: BaseException, *, with_traceback: bool = True) -> str:
    """``Type: message`` plus the traceback, cut in the middle to stay under 8 KiB."""
    if with_traceback and exc.__traceback__ is not None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        head = f"{type(exc).__name__}: {exc}".strip()
        text = f"{head}\n{text}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = text.replace("\x00", "\\x00")
    if len(text) <= MAX_ERROR_CHARS:
        return text
    keep = (MAX_ERROR_CHARS - 40) // 2
    return f"{text[:keep]}\n... [{len(text) - 2 * keep} characters cut] ...\n{text[-keep:]}"


def decide(
    exc: BaseException | None,
    *,
    attempt: int,
    max_attempts: int,
    policy: RetryPolicy,
    non_retryable: tuple[type[BaseException], ...] = (),
) -> Outcome:
    """Map a handler's result (``exc`` None for success) to an :class:`Outcome`.

    ``attempt`` already counts this run. A ``Snooze`` never dead-letters (it gives the
    attempt back); every other failure dead-letters once ``attempt >= max_attempts``.
    """
    if exc is None:
        return COMPLETE
    if isinstance(exc, Snooze):
        return Outcome("snooze", delay_seconds=exc.delay_seconds, error=f"snoozed: {exc.reason}")
    if isinstance(exc, Cancel):
        return Outcome("fail", reason="cancelled", error=f"Cancel: {exc.reason}")
    if isinstance(exc, NonRetryable) or (non_retryable and isinstance(exc, non_retryable)):
        return Outcome("fail", reason="non_retryable", error=format_error(exc))
    error = f"Retry: {exc.reason}" if isinstance(exc, Retry) else format_error(exc)
    if attempt >= max_attempts:
        return Outcome("fail", reason="max_attempts", error=error)
    if isinstance(exc, Retry) and exc.delay_seconds is not None:
        delay = exc.delay_seconds
    else:
        delay = policy.delay_seconds(attempt)
    return Outcome("retry", delay_seconds=delay, error=error)
