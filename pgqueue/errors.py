"""The exception tree of pgqueue, and the control-flow signals a handler may raise.

PgQueueError
├── ConfigurationError      bad settings: DSN, app path, schema name
├── SchemaNotReady          the schema is missing or older/newer than this code
├── NotFound                a job, queue or message that does not exist
├── DuplicateJob            a live job already holds this (queue, unique key)
├── QueueFull               the queue is at its configured maximum depth
├── PayloadTooLarge         arguments exceed the maximum payload size
├── LeaseLost               the job's lease was taken over; the result is discarded
└── DatabaseError           anything else from PostgreSQL; ``is_transient`` says retry

JobControl (raised by handlers, not errors)
├── Retry(delay)            try again after ``delay``; consumes the attempt
├── Snooze(delay)           try again after ``delay``; gives the attempt back
└── Cancel(reason)          stop now: straight to the dead letters

NonRetryable                subclass (or raise) for failures no retry can fix
"""

from __future__ import annotations

from datetime import timedelta


class PgQueueError(Exception):
    """Base class of every error pgqueue raises on purpose."""


class ConfigurationError(PgQueueError):
    """A setting is missing or wrong; the message says which and how to fix it."""


class SchemaNotReady(PgQueueError):
    """The pgqueue schema is not migrated (or is newer than this code)."""


class NotFound(PgQueueError):
    """The job, queue or message does not exist."""


class DuplicateJob(PgQueueError):
    """A live job with the same (queue, unique key) exists; ``job_id`` is that job."""

    def __init__(self, message: str, job_id: int) -> None:
        super().__init__(message)
        self.job_id = job_id


class QueueFull(PgQueueError):
    """The queue holds its maximum number of waiting jobs."""


class PayloadTooLarge(PgQueueError, ValueError):
    """The encoded arguments are larger than the configured maximum."""


class LeaseLost(PgQueueError):
    """The worker no longer holds the job's lease: its result must be discarded."""


class DatabaseError(PgQueueError):
    """An error from PostgreSQL or the connection to it.

    ``is_transient`` is true when retrying the same operation later may succeed
    (connection lost, server shutting down, serialization failure, deadlock).
    ``sqlstate`` is the five-character SQLSTATE when the server sent one.
    """

    def __init__(self, message: str, *, is_transient: bool, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.is_transient = is_transient
        self.sqlstate = sqlstate


class NonRetryable(Exception):
    """Raise (or subclass) for a failure that no retry can fix: the job is dead-lettered."""


class JobControl(Exception):
    """Base of the signals a handler raises to steer its job."""


def _seconds(delay: float | timedelta) -> float:
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if not seconds >= 0:
        raise ValueError(
            f"delay must be a non-negative number of seconds or a timedelta, got {delay!r}"
        )
    return seconds


class Retry(JobControl):
    """Run the job again after ``delay`` (seconds or timedelta); the attempt counts.

    With no delay, the task's backoff policy decides.
    """

    def __init__(
        self, delay: float | timedelta | None = None, reason: str = "retry requested"
    ) -> None:
        super().__init__(reason)
        self.delay_seconds = None if delay is None else _seconds(delay)
        self.reason = reason


class Snooze(JobControl):
    """Run the job again after ``delay``; the attempt is given back (not counted)."""

    def __init__(self, delay: float | timedelta, reason: str = "snoozed") -> None:
        super().__init__(reason)
        self.delay_seconds = _seconds(delay)
        self.reason = reason


class Cancel(JobControl):
    """Stop the job for good: it goes to the dead letters with ``reason``."""

    def __init__(self, reason: str = "cancelled by handler") -> None:
        super().__init__(reason)
        self.reason = reason
