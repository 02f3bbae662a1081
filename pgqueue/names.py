"""Allow-lists for every identifier that reaches SQL: queues, tasks, topics and schemas."""

from __future__ import annotations

import re

MAX_NAME_BYTES = 48
MAX_SCHEMA_BYTES = 30

# ASCII only, so a character is a byte and the length rule is easy to state.
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,48}")
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,29}")
_NAME_RULE = "letters, digits, '_', '-' and '.' only, 1 to 48 bytes"
_SCHEMA_RULE = "lowercase letters, digits and '_', starting with a letter or '_', 1 to 30 bytes"


def _check(kind: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{kind} name must be a str, got {type(value).__name__}")
    if pattern.fullmatch(value) is None:
        raise ValueError(f"invalid {kind} name {value!r}: use {rule}")
    return value


def queue_name(value: object) -> str:
    """Return ``value`` if it is a valid queue name, else raise ``ValueError``."""
    return _check("queue", value, _NAME, _NAME_RULE)


def task_name(value: object) -> str:
    """Return ``value`` if it is a valid task name, else raise ``ValueError``."""
    return _check("task", value, _NAME, _NAME_RULE)


def topic_name(value: object) -> str:
    """Return ``value`` if it is a valid outbox topic name, else raise ``ValueError``."""
    return _check("topic", value, _NAME, _NAME_RULE)


def schema_name(value: object) -> str:
    """Return ``value`` if it is a valid schema name, else raise ``ValueError``."""
    return _check("schema", value, _SCHEMA, _SCHEMA_RULE)


def key_value(kind: str, value: object) -> str:
    """Validate an ordering or unique key: any non-empty text up to 256 bytes, no NUL."""
    if not isinstance(value, str):
        raise TypeError(f"{kind} must be a str, got {type(value).__name__}")
    encoded = value.encode("utf-8", errors="strict") if value.isascii() else _utf8(kind, value)
    if not encoded or len(encoded) > 256 or "\x00" in value:
        raise ValueError(f"invalid {kind} {value!r}: use 1 to 256 bytes of text without NUL")
    return value


def _utf8(kind: str, value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"invalid {kind}: not encodable as UTF-8 ({exc.reason})") from None
