"""Fixtures for the sink tests: real loopback servers and a message factory."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
import redis

from pgqueue.sinks import Message
from tests.servers import HttpReceiver, RedisServer

MakeMessage = Callable[..., Message]


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    with HttpReceiver() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL, emptied for this test."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain synchronous client to inspect what a sink wrote."""
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client


@pytest.fixture
def make_message() -> MakeMessage:
    def make(**changes: Any) -> Message:
        fields: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "sequence": 1,
            "topic": "orders",
            "key": "customer-42",
            "payload": {"order": 7, "total": "12.50", "note": "crème brûlée"},
            "headers": {"trace-id": "abc123"},
            "attempt": 1,
            "created_at": datetime(2024, 5, 1, 12, 30, 0, 123456, tzinfo=timezone.utc),
        }
        fields.update(changes)
        return Message(**fields)

    return make
