"""Publish outbox messages on the caller's connection, inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pgqueue import db
from pgqueue.config import resolve_schema
from pgqueue.names import key_value, topic_name
from pgqueue.payload import DEFAULT_MAX_PAYLOAD_BYTES, encode


@dataclass(frozen=True)
class OutboxMessage:
    """One message for :func:`publish_many`."""

    topic: str
    payload: Any
    key: str | None = None
    headers: Mapping[str, str] | None = None
    delay: float | timedelta | None = None


def outbox_channel(schema: str) -> str:
    """The NOTIFY channel relays listen on (computed the same way in SQL)."""
    import hashlib

    digest = hashlib.md5(f"{schema}:outbox".encode(), usedforsecurity=False).hexdigest()
    return f"pgqueue_{digest[:24]}"


def _columns(messages: Iterable[OutboxMessage], max_payload_bytes: int) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {
        "topic": [],
        "key": [],
        "payload": [],
        "headers": [],
        "delay": [],
    }
    for index, message in enumerate(messages):
        try:
            headers = dict(message.headers or {})
            for name, value in headers.items():
                if not isinstance(name, str) or not isinstance(value, str):
                    raise TypeError("headers must map str to str")
            delay = message.delay
            seconds = delay.total_seconds() if isinstance(delay, timedelta) else (delay or 0.0)
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
                raise ValueError("delay must be a non-negative number of seconds or a timedelta")
            columns["topic"].append(topic_name(message.topic))
            columns["key"].append(None if message.key is None else key_value("key", message.key))
            columns["payload"].append(
                encode(message.payload, what="payload", max_bytes=max_payload_bytes)
            )
            columns["headers"].append(encode(headers, what="headers", max_bytes=max_payload_bytes))
            columns["delay"].append(float(seconds))
        except (TypeError, ValueError) as exc:
            if isinstance(messages, _Single):
                raise
            raise type(exc)(f"messages[{index}]: {exc}") from None
    return columns


class _Single(list[OutboxMessage]):
    """Marks a one-message call, whose errors need no ``messages[0]:`` prefix."""


def build(
    messages: Iterable[OutboxMessage], schema: str | None, max_payload_bytes: int
) -> tuple[db.Query, dict[str, Any]] | None:
    """The query and parameters that publish ``messages`` (shared by the twins)."""
    columns = _columns(messages, max_payload_bytes)
    if not columns["topic"]:
        return None
    return db.queries(resolve_schema(schema))["publish_messages"], dict(columns)


def _ids(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(row["message_id"]) for row in rows]


def publish(
    conn: Any,
    topic: str,
    payload: Any,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    delay: float | timedelta | None = None,
    schema: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> str:
    """Write an outbox message in the caller's transaction; return its message id.

    The message id (a UUID) is fixed now and travels with every delivery, so receivers can
    drop duplicates. Messages with the same ``key`` are delivered one at a time in commit
    order; a rollback leaves no message.

    >>> with psycopg.connect(dsn) as conn, conn.transaction():
    ...     conn.execute("INSERT INTO orders ...")
    ...     pgqueue.publish(conn, "order.created", {"id": 42}, key="order-42")
    """
    message = OutboxMessage(topic, payload, key, headers, delay)
    built = build(_Single([message]), schema, max_payload_bytes)
    assert built is not None
    return _ids(db.run_sync(db.sync_connection(conn), *built))[0]


async def publish_async(
    conn: Any,
    topic: str,
    payload: Any,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    delay: float | timedelta | None = None,
    schema: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> str:
    """The async twin of :func:`publish`."""
    message = OutboxMessage(topic, payload, key, headers, delay)
    built = build(_Single([message]), schema, max_payload_bytes)
    assert built is not None
    return _ids(await db.run_async(await db.async_connection(conn), *built))[0]


def publish_many(
    conn: Any,
    messages: Iterable[OutboxMessage],
    *,
    schema: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> list[str]:
    """Publish many messages in one round trip; message ids in input order."""
    built = build(messages, schema, max_payload_bytes)
    return [] if built is None else _ids(db.run_sync(db.sync_connection(conn), *built))


async def publish_many_async(
    conn: Any,
    messages: Iterable[OutboxMessage],
    *,
    schema: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> list[str]:
    """The async twin of :func:`publish_many`."""
    built = build(messages, schema, max_payload_bytes)
    if built is None:
        return []
    return _ids(await db.run_async(await db.async_connection(conn), *built))
