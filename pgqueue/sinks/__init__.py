"""The Sink protocol: where the relay delivers outbox messages. Implementations live beside it.

A sink delivers one message at a time per call; the relay decides concurrency (bounded per
sink), retries with backoff, the circuit breaker and dead-lettering. A sink only says how a
delivery went: return normally when the destination accepted the message, raise
:class:`DeliveryError` (``is_permanent`` for failures no retry can fix, such as HTTP 4xx)
otherwise. Any other exception counts as a transient failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

MESSAGE_ID_HEADER = "Pgqueue-Message-Id"


@dataclass(frozen=True)
class Message:
    """An outbox message as a sink sees it.

    ``id`` is the stable message id (a UUID string, fixed at publish time): it travels with
    every delivery attempt so that receivers can drop duplicates. ``sequence`` is the row id,
    for logs only (it is not commit-ordered).
    """

    id: str
    sequence: int
    topic: str
    key: str | None
    payload: Any
    headers: Mapping[str, str]
    attempt: int
    created_at: datetime


class DeliveryError(Exception):
    """The destination did not accept the message.

    ``is_permanent``: retrying cannot help (the message goes to the outbox dead letters).
    ``retry_after_seconds``: the destination asked for a pause (e.g. HTTP Retry-After).
    """

    def __init__(
        self, message: str, *, is_permanent: bool = False, retry_after_seconds: float | None = None
    ) -> None:
        super().__init__(message)
        self.is_permanent = is_permanent
        self.retry_after_seconds = retry_after_seconds


@runtime_checkable
class Sink(Protocol):
    """A destination for outbox messages.

    ``name`` identifies the sink in logs, metrics and the outbox tables (allow-listed like a
    queue name). ``max_in_flight`` bounds concurrent deliveries to it. ``start``/``close``
    open and release connections; ``deliver`` sends one message and returns only once the
    destination has accepted it (for a broker: after its publisher confirmation).
    """

    name: str
    max_in_flight: int

    async def start(self) -> None: ...

    async def deliver(self, message: Message) -> None: ...

    async def close(self) -> None: ...
