"""What a handler sees of its job: plain data plus a hook into the worker for ``transaction()``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
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
    created_at: datetime
    run_at: datetime
    _provider: TransactionProvider | None = field(default=None, repr=False, compare=False)
    is_acknowledged: bool = field(default=False, compare=False)

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
