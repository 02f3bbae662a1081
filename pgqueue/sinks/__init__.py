"""The Sink protocol: where the relay delivers outbox messages. Implementations live beside it.

A sink delivers one message at a time per call; the relay decides concurrency (bounded per
sink), retries with backoff, the circuit breaker and dead-lettering. A sink only says how a
delivery went: return normally when the destination accepted the message, raise
:class:`DeliveryError` (``is_permanent`` for failures no retry can fix, such as HTTP 4xx)
otherwise. Any other exception counts as a transient failure.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from pgqueue.payload import encode, safe_loads

MESSAGE_ID_HEADER = "Pgqueue-Message-Id"
# Marks a payload not decoded yet (None is a valid JSON value).
_UNSET: Any = object()


class Message:
    """An outbox message as a sink sees it (read-only).

    ``id`` is the stable message id (a UUID string, fixed at publish time): it travels with
    every delivery attempt so that receivers can drop duplicates. ``sequence`` is the row id,
    for logs only (it is not commit-ordered).

    ``payload`` is the decoded JSON value. ``payload_json`` is its JSON text: as stored, for a
    message the relay read (decoded only when a sink reads ``payload``), so a sink that
    forwards JSON (the webhook and Redis sinks) passes it on without a decode and an encode.

    Example::

        Message(id=str(uuid4()), sequence=1, topic="order.created", key="42",
                payload={"order_id": 42}, headers={}, attempt=1,
                created_at=datetime.now(timezone.utc))
    """

    __slots__ = (
        "_payload",
        "_payload_json",
        "attempt",
        "created_at",
        "headers",
        "id",
        "key",
        "sequence",
        "topic",
    )
    id: str
    sequence: int
    topic: str
    key: str | None
    headers: Mapping[str, str]
    attempt: int
    created_at: datetime
    _payload: Any
    _payload_json: str | None

    def __init__(
        self,
        id: str,
        sequence: int,
        topic: str,
        key: str | None,
        payload: Any = _UNSET,
        headers: Mapping[str, str] | None = None,
        attempt: int = 1,
        created_at: datetime | None = None,
        *,
        payload_json: str | None = None,
    ) -> None:
        if (payload is _UNSET) == (payload_json is None):
            raise TypeError(
                "Message takes payload (a JSON value) or payload_json (its text), one of them"
            )
        if payload_json is not None and not isinstance(payload_json, str):
            raise TypeError(f"payload_json must be str, got {type(payload_json).__name__}")
        if created_at is None:
            raise TypeError("Message needs created_at (an aware datetime)")
        values = {
            "id": id,
            "sequence": sequence,
            "topic": topic,
            "key": key,
            "headers": {} if headers is None else headers,
            "attempt": attempt,
            "created_at": created_at,
            "_payload": payload,
            "_payload_json": payload_json,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def payload(self) -> Any:
        if self._payload is _UNSET:
            assert self._payload_json is not None
            object.__setattr__(self, "_payload", safe_loads(self._payload_json))
        return self._payload

    @property
    def payload_json(self) -> str:
        """The payload as JSON text. Raises ``TypeError``/``ValueError`` for a payload given
        as a Python value that JSON cannot hold (NaN and infinities included)."""
        stored = self._payload_json
        if stored is None:
            stored = encode(self._payload, what="payload", max_bytes=sys.maxsize)
            object.__setattr__(self, "_payload_json", stored)
        return stored

    def replace(self, **changes: Any) -> Message:
        """A copy with ``changes`` (the constructor's arguments); the stored JSON text
        travels along unless ``payload`` or ``payload_json`` is given.

        Example::

            await inner.deliver(message.replace(headers={**message.headers, "x-tenant": "7"}))
        """
        arguments = self._arguments()
        if "payload" in changes or "payload_json" in changes:
            arguments.pop("payload", None)
            arguments.pop("payload_json", None)
        return Message(**{**arguments, **changes})

    __replace__ = replace  # copy.replace (Python 3.13)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through the constructor (the attributes are read-only), by keyword.
        return (_rebuilt, (self._arguments(),))

    def _arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "id": self.id,
            "sequence": self.sequence,
            "topic": self.topic,
            "key": self.key,
            "headers": self.headers,
            "attempt": self.attempt,
            "created_at": self.created_at,
        }
        if self._payload_json is not None:
            arguments["payload_json"] = self._payload_json
        else:
            arguments["payload"] = self._payload
        return arguments

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        # Equal payloads compare equal whichever form (text or value) each message holds.
        mine, theirs = self._arguments(), other._arguments()
        for arguments in (mine, theirs):
            arguments.pop("payload", None)
            arguments.pop("payload_json", None)
        return mine == theirs and self.payload == other.payload

    __hash__ = None  # type: ignore[assignment]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Message is read-only (tried to set {name!r})")

    def __repr__(self) -> str:
        return (
            f"Message(id={self.id!r}, sequence={self.sequence!r}, topic={self.topic!r}, "
            f"key={self.key!r}, attempt={self.attempt!r})"
        )


def _rebuilt(arguments: dict[str, Any]) -> Message:
    return Message(**arguments)


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

    Optional: a sink with ``forwards_payload_json = True`` sends ``message.payload_json`` on
    as it is and never reads ``message.payload``. The relay then also hands it payloads that
    Python's JSON decoder cannot read (nested past its limit), which other sinks never see:
    those are dead-lettered as ``undecodable``. A subclass of such a sink that reads
    ``message.payload`` must set it back to False.
    """

    name: str
    max_in_flight: int

    async def start(self) -> None: ...

    async def deliver(self, message: Message) -> None: ...

    async def close(self) -> None: ...
