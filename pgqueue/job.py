"""What a handler sees of its job: plain data plus a hook into the worker for ``transaction()``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol
from uuid import UUID


class TransactionProvider(Protocol):
    """Implemented by the worker: opens a transaction that also acknowledges ``job``."""

    def transaction(self, job: Job) -> Any: ...


@dataclass(slots=True)
class Job:
    """A claimed job, passed to the handler as its first argument.

    ``attempt`` counts from 1 and already includes this run. ``lease_token`` fences every
    write the worker makes for this job: once another worker holds the job, those writes
    match zero rows and are discarded.
    """

    id: int
    queue: str
    task: str
    args: Mapping[str, Any]
    headers: Mapping[str, str]
    priority: int
    attempt: int
    max_attempts: int
    timeout_seconds: float | None
    lease_token: UUID
    ordering_key: str | None
    # Seconds since the Unix epoch, as the claim returns them: two datetimes per claimed
    # row cost more than running a no-op handler, so they are built only when read.
    created_epoch: float = field(repr=False)
    run_epoch: float = field(repr=False)
    _provider: TransactionProvider | None = field(default=None, repr=False, compare=False)
    is_acknowledged: bool = field(default=False, compare=False)

    @property
    def created_at(self) -> datetime:
        """When the job was enqueued (database clock, UTC)."""
        return _from_epoch(self.created_epoch)

    @property
    def run_at(self) -> datetime:
        """When the job became due (database clock, UTC)."""
        return _from_epoch(self.run_epoch)

    @property
    def is_last_attempt(self) -> bool:
        """True when a failure now sends the job to the dead letters."""
        return self.attempt >= self.max_attempts

    def transaction(self) -> Any:
        """A database transaction that commits together with this job's acknowledgement.

        Sync handlers use ``with job.transaction() as conn:``, async handlers
        ``async with job.transaction() as conn:`` (a psycopg connection either way). The
        handler's writes and the ack commit atomically; if the lease was lost meanwhile,
        :class:`pgqueue.LeaseLost` is raised and the writes roll back.
        """
        if self._provider is None:
            raise RuntimeError("job.transaction() is only available while a worker runs the job")
        return self._provider.transaction(self)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _from_epoch(seconds: float) -> datetime:
    # Whole microseconds, as PostgreSQL stores them: a float8 near today's epoch is exact to
    # a quarter of a microsecond, so rounding recovers the stored value.
    return _EPOCH + timedelta(microseconds=round(seconds * 1_000_000))
